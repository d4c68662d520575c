"""The command line and the typed config: presets, dotted overrides, exit codes."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vitlab import cli
from vitlab.config import ConfigError, TrainConfig, build_config, parse_overrides, set_key


ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "vitlab.cli", *args], capture_output=True, text=True, timeout=120)


def test_models_lists_every_preset_with_parameter_count():
    r = run_cli("models")
    assert r.returncode == 0, r.stderr
    assert "vit_b16" in r.stdout and "86,567,656" in r.stdout
    assert "vit_tiny " in r.stdout and "8,459,762" in r.stdout
    for name in ["vit_tiny_patch4_32", "vit_large_patch32_224", "deit_tiny_distilled_patch16_224", "resnet18_cifar"]:
        assert name in r.stdout


def test_unknown_command_and_option_exit_2_with_one_line():
    r = run_cli("trian")
    assert r.returncode == 2 and "unknown command 'trian'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_cli("models", "--nope")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_dotted_overrides_and_aliases_are_typed():
    ov = parse_overrides(["--optim.lr", "1e-3", "--epochs=7", "--mixup-alpha", "0.4", "--debug",
                          "--autoaugment", "--data-dir", "/tmp/x", "--model", "vit_tiny"])
    cfg = build_config(None, ov)
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.run.epochs == 7 and isinstance(cfg.run.epochs, int)
    assert cfg.aug.mixup_alpha == 0.4
    assert cfg.run.debug is True and cfg.aug.autoaugment is True
    assert cfg.data.dir == "/tmp/x" and cfg.model.name == "vit_tiny"
    # an optional switch takes auto (as eval's --compile does) for its unset "decide for me" value
    assert build_config(None, parse_overrides(["--compile", "auto"])).run.compile is None
    assert build_config(None, parse_overrides(["--compile", "true"])).run.compile is True
    with pytest.raises(ConfigError, match="run.compile expects bool or auto, got 'maybe'"):
        build_config(None, parse_overrides(["--compile", "maybe"]))
    with pytest.raises(ConfigError, match="run.ema expects bool"):  # not optional: auto means nothing
        build_config(None, parse_overrides(["--ema", "auto"]))


def test_debug_is_short_unless_asked_and_keeps_a_bad_subset_refused(tmp_path):
    from vitlab.config import apply_debug

    assert build_config(None, parse_overrides(["--debug"])).run.epochs == 2  # not the default 100
    assert build_config("shapes", parse_overrides(["--debug"])).run.epochs == 2
    assert build_config(None, parse_overrides(["--debug", "--epochs", "5"])).run.epochs == 5
    assert build_config(None, parse_overrides([])).run.epochs == 100
    # a config file that says debug (a debug run's own config.yaml, replayed) keeps the epochs it states
    (tmp_path / "dbg.yaml").write_text("run: {debug: true, epochs: 3}\n")
    assert build_config(str(tmp_path / "dbg.yaml"), {}).run.epochs == 3
    cfg = build_config(None, parse_overrides(["--debug", "--data.subset", "0"]))
    apply_debug(cfg)
    assert cfg.data.subset == 0  # still 0, so build_data refuses it (it had become 512)
    cfg = build_config(None, parse_overrides(["--debug"]))
    apply_debug(cfg)
    assert cfg.data.subset == 512


def test_negative_numbers_are_values_not_flags():
    cfg = build_config(None, parse_overrides(["--run.seed", "-5"]))
    assert cfg.run.seed == -5
    with pytest.raises(ConfigError, match=r"--optim.beta1 must be a number in \[0, 1\), got -0.5"):
        build_config(None, parse_overrides(["--optim.beta1", "-0.5"]))  # parsed as a value, then refused


@pytest.mark.parametrize("args, key", [
    (["--lr", "-1"], "optim.lr"), (["--lr", "nan"], "optim.lr"), (["--optim.beta2", "1"], "optim.beta2"),
    (["--drop-path", "1.5"], "model.drop_path_rate"), (["--epochs", "0"], "run.epochs"),
    (["--run.eval_every", "0"], "run.eval_every"), (["--run.threads", "-1"], "run.threads"),
    (["--sched.name", "bogus"], "sched.name"), (["--weight-decay", "-1"], "optim.weight_decay"),
    (["--label-smoothing", "1"], "optim.label_smoothing"), (["--warmup-epochs", "-1"], "sched.warmup_epochs"),
    (["--run.ema_decay", "2"], "run.ema_decay"), (["--optim.accum_steps", "0"], "optim.accum_steps"),
    (["--model.num_classes", "0"], "model.num_classes"), (["--optim.clip_grad", "-1"], "optim.clip_grad"),
    (["--data.on_corrupt", "bogus"], "data.on_corrupt"), (["--run.time_limit", "0"], "run.time_limit"),
    (["--distill.kind", "soft", "--distill.tau", "0"], "distill.tau"),
    (["--mixup-alpha", "-2"], "aug.mixup_alpha"), (["--cutmix-alpha", "-1"], "aug.cutmix_alpha"),
    (["--aug.mix_prob", "1.5"], "aug.mix_prob"), (["--aug.repeated_aug", "0"], "aug.repeated_aug"),
])
def test_out_of_range_values_are_refused_naming_the_key(args, key):
    with pytest.raises(ConfigError, match=f"^--{key} must be "):
        build_config(None, parse_overrides(args))


def test_every_value_rule_names_a_real_field_and_accepts_the_default():
    from vitlab.config import VALUE_RULES, all_keys, check_values

    assert set(VALUE_RULES) <= set(all_keys())
    check_values(TrainConfig())
    with pytest.raises(ConfigError, match="--distill.kind is none"):  # a teacher that would be ignored
        build_config(None, parse_overrides(["--distill.teacher", "runs/x"]))


def test_a_bad_value_stops_train_in_one_line_before_a_run_directory_exists(tmp_path):
    r = run_cli("train", "--data", "shapes", "--sched.name", "bogus", "--out", str(tmp_path), "--run.name", "x")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--sched.name must be one of" in r.stderr
    assert not (tmp_path / "x").exists()


def test_ablate_print_config_shows_each_rungs_settings_without_running_them(tmp_path, capsys):
    assert cli.main(["ablate", "--config", "shapes", "--rungs", "3", "--lr", "1e-3", "--label-smoothing", "0.2",
                     "--out", str(tmp_path), "--print-config"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["optim"]["name"] for d in docs] == ["sgd", "adamw", "adamw"]
    assert [d["sched"]["name"] for d in docs] == ["constant", "constant", "cosine"]
    # a user's value is its ingredient's strength from the rung that switches it on (AdamW's lr from
    # rung 1, SGD keeping its own); before that rung the ingredient stays off, so rung 1's gain is AdamW's alone
    assert [d["optim"]["lr"] for d in docs] == [0.05, 1e-3, 1e-3]
    assert [d["optim"]["label_smoothing"] for d in docs] == [0.0, 0.0, 0.0]
    assert [d["run"]["name"] for d in docs] == ["rung0", "rung1", "rung2"]
    assert list(tmp_path.iterdir()) == []  # nothing trained, no folder made
    assert cli.main(["ablate", "--config", "shapes", "--label-smoothing", "0.2", "--cutmix-alpha", "1.0",
                     "--epochs", "7", "--print-config"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["optim"]["label_smoothing"] for d in docs] == [0.0, 0.0, 0.0, 0.2, 0.2, 0.2]
    assert [d["aug"]["cutmix_alpha"] for d in docs] == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]  # with Mixup's rung
    assert [d["aug"]["mixup_alpha"] for d in docs] == [0.0, 0.0, 0.0, 0.0, 0.2, 0.2]
    assert {d["run"]["epochs"] for d in docs} == {7}
    # the ladder's own comparison is not the user's to set
    assert cli.main(["ablate", "--config", "shapes", "--optim.name", "muon", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "--optim.name is what the ladder compares" in err and len(err.strip().splitlines()) == 1


def test_ablate_names_the_preset_values_its_ladder_replaces_and_counts_time_limited_rungs_done(tmp_path):
    from vitlab.train.ablate import _done, preset_values_replaced

    base = build_config("shapes", parse_overrides(["--lr", "1e-3"]))
    # shapes sets lr 2e-3 (a flag repeats it: the flag's), warmup 1, Mixup and DropPath 0; label smoothing 0.1 = default
    assert preset_values_replaced(base, {"optim.lr": "1e-3"}) == [
        "sched.warmup_epochs 1.0", "aug.mixup_alpha 0.0", "model.drop_path_rate 0.0"]
    from vitlab.train.checkpoint import save_state

    rows = [{"epoch": 1, "test_acc": 50.0}, {"epoch": 2, "test_acc": 60.0}]
    save_state(tmp_path / "last.ckpt", {"epoch": 2, "history": rows})  # done as the saved state says
    assert _done(tmp_path, 2) and not _done(tmp_path, 3)
    rows[-1]["stopped"] = "time_limit"
    save_state(tmp_path / "last.ckpt", {"epoch": 2, "history": rows})
    assert _done(tmp_path, 3)
    (tmp_path / "last.ckpt").write_bytes(b"")  # an unreadable state: not done (resuming it says why)
    assert not _done(tmp_path, 1)


def test_help_examples_name_presets_and_models_that_exist(capsys):
    """Every `--config NAME` and `--model NAME` in a command's --help and in the README is real."""
    import importlib
    import re

    from vitlab.config import CONFIG_DIR
    from vitlab.models import PRESETS

    presets = {p.stem for p in CONFIG_DIR.glob("*.yaml")}

    texts = {"README.md": (ROOT / "README.md").read_text()}
    for name, (module, help_) in cli.COMMANDS.items():
        parser = cli.Parser(prog=f"vitlab {name}", description=help_)
        importlib.import_module(module).add_arguments(parser)
        texts[f"vitlab {name} --help"] = parser.format_help()
    checked = 0
    for where, text in texts.items():
        for flag, value in re.findall(r"--(config|model) ([A-Za-z0-9_][A-Za-z0-9_./-]*)", text):
            if flag == "config" and not value.endswith((".yaml", ".yml")) and value not in ("PRESET_OR_FILE",):
                assert value in presets, (where, value)
                checked += 1
            elif flag == "model" and value.upper() != value:
                assert value in PRESETS, (where, value)
                checked += 1
    assert checked >= 10


def test_usage_errors_of_each_command_are_one_line_exit_2(capsys):
    cases = [
        ([], "name a command"),
        (["ablate", "--rungs", "0"], "--rungs must be 1 to"),
        (["ablate", "--rungs", "-1"], "--rungs must be 1 to"),
        (["predict", "x.png", "--checkpoint", "x", "--top-k", "0"], "--top-k must be positive"),
        (["export", "--checkpoint", "x", "--out", "y", "--num-heads", "0"], "--num-heads must be positive"),
        (["bench", "--threads", "-1"], "--threads must be positive"),
        (["finetune", "--pretrained", "x", "--model", "vit_tiny"], "--model is not used by finetune"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_a_config_file_that_is_not_text_is_one_error(tmp_path):
    from vitlab.config import load_yaml

    (tmp_path / "bin.yaml").write_bytes(b"\x00\xff\xfe\x80")
    with pytest.raises(ConfigError, match="not a text"):
        load_yaml(tmp_path / "bin.yaml")


def test_an_output_path_that_cannot_be_a_folder_is_a_user_error(tmp_path):
    from vitlab.errors import UserError
    from vitlab.utils import atomic_write_text, make_dir

    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        make_dir(tmp_path / "file")
    with pytest.raises(UserError, match="cannot create the folder"):
        make_dir(tmp_path / "file" / "sub")
    with pytest.raises(UserError, match="file exists and is not a folder"):  # eval --out FILE, visualize, ...
        atomic_write_text(tmp_path / "file" / "eval.json", "{}")
    assert make_dir(tmp_path / "a" / "b").is_dir()


def test_write_json_makes_its_folder_and_leaves_no_partial_file(tmp_path):
    import json

    from vitlab.errors import UserError
    from vitlab.utils import write_json

    path = write_json(tmp_path / "new" / "deeper" / "r.json", {"a": [1, 2.5], "b": None})
    assert json.loads(path.read_text()) == {"a": [1, 2.5], "b": None} and path.read_text().endswith("}\n")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):  # a benchmark's --out FILE
        write_json(tmp_path / "file" / "r.json", {})
    with pytest.raises(TypeError):  # not JSON: nothing is written, the old record stays whole
        write_json(path, {"x": object()})
    assert json.loads(path.read_text())["a"] == [1, 2.5]


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(ConfigError, match="did you mean 'optim.lr'"):
        parse_overrides(["--optim.lrr", "1"])
    with pytest.raises(ConfigError, match="did you mean 'optim.weight_decay'"):
        parse_overrides(["--optim.weight-decy", "1"])
    with pytest.raises(ConfigError, match="run.epochs expects int"):
        build_config(None, {"run.epochs": "ten"})
    with pytest.raises(ConfigError, match="optim.lr expects float"):
        set_key(TrainConfig(), "optim.lr", "fast")


def test_none_for_optional_fields():
    cfg = build_config(None, parse_overrides(["--optim.clip_grad", "none"]))
    assert cfg.optim.clip_grad is None


def test_every_shipped_preset_loads_names_a_real_model_and_states_command_time_and_accuracy():
    from vitlab.config import CONFIG_DIR, load_yaml
    from vitlab.models import PRESETS

    files = sorted(CONFIG_DIR.glob("*.yaml"))
    assert {"fashion_mnist", "fashion_mnist_plain", "fashion_mnist_60min", "shapes"} <= {f.stem for f in files}
    for f in files:
        head = f.read_text().split("\n\n")[0]
        for field in ("# command:", "# time:", "# expect:"):
            assert field in head, f"{f.name} does not state its {field}"
        cfg = build_config(f.stem, {})
        assert cfg.model.pretrained or cfg.model.name in PRESETS, f.name
        raw = load_yaml(f)
        assert all(isinstance(v, dict) for v in raw.values()), f"{f.name}: top level must be sections"
    # The 15-minute Fashion-MNIST preset is the hybrid ViT; its plain twin differs only in model and
    # compile, and in the clean tail, flip-TTA logging, fifth-epoch scoring and Muon the hybrid gained
    # after the plain runs were measured.
    hybrid, plain = build_config("fashion_mnist", {}), build_config("fashion_mnist_plain", {})
    assert PRESETS[hybrid.model.name].kwargs.get("conv_stem") and not PRESETS[plain.model.name].kwargs.get("conv_stem")
    assert (hybrid.aug.clean_tail, hybrid.run.tta, hybrid.run.eval_every) == (0.25, True, 5)
    assert (plain.aug.clean_tail, plain.run.tta, plain.run.eval_every) == (0.0, False, 1)
    set_key(plain, "model.name", hybrid.model.name)
    set_key(plain, "run.compile", True)
    set_key(plain, "aug.clean_tail", 0.25)
    set_key(plain, "run.tta", True)
    set_key(plain, "run.eval_every", 5)
    assert (hybrid.optim.name, plain.optim.name) == ("muon", "adamw")
    set_key(plain, "optim.name", "muon")
    assert plain == hybrid


def test_a_bare_flag_for_a_field_that_is_not_boolean_asks_for_its_value():
    with pytest.raises(ConfigError, match=r"--optim.lr needs a value \(--optim.lr VALUE\)"):
        parse_overrides(["--optim.lr"])
    with pytest.raises(ConfigError, match="--lr needs a value"):
        parse_overrides(["--lr", "--debug"])
    assert parse_overrides(["--debug", "--ema"]) == {"run.debug": True, "run.ema": True}  # booleans: on


def test_brief_keeps_a_library_message_to_one_line_without_cutting_a_word():
    from vitlab.errors import brief

    torch_msg = ("PytorchStreamReader failed reading zip archive: failed finding central directory. This is an "
                 "internal miniz error. If you are seeing this error, there is a high likelihood that your "
                 "checkpoint file is corrupted.")
    assert brief(torch_msg) == "PytorchStreamReader failed reading zip archive: failed finding central directory."
    assert brief("short\nsecond line") == "short"
    # a cut inside a word goes back to the word's start
    assert brief("alpha beta gamma delta epsilon zeta", limit=19) == "alpha beta gamma..."
    assert brief("(e.g. a short first sentence) then a long tail " * 5, limit=40) == "(e.g. a short first sentence) then a..."
    assert brief(ValueError("")) == "ValueError"


def test_vitlab_warnings_print_as_one_line_and_others_keep_python_s_format(capsys):
    import warnings

    from vitlab.cli import _one_line_warnings
    from vitlab.errors import VitlabWarning

    saved, others = warnings.showwarning, []
    try:
        warnings.showwarning = lambda *a, **k: others.append(a[1])  # stands for Python's own printer
        _one_line_warnings("vitlab train")
        warnings.showwarning("skipping unreadable image a.png (OSError: truncated) (1 so far)", VitlabWarning,
                             "files.py", 194)
        warnings.showwarning("a library's note", DeprecationWarning, "lib.py", 1)
    finally:
        warnings.showwarning = saved
    assert capsys.readouterr().err.splitlines() == [
        "vitlab train: warning: skipping unreadable image a.png (OSError: truncated) (1 so far)"]
    assert others == [DeprecationWarning]


def test_the_readme_models_table_lists_every_preset_with_its_count():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z0-9_]+)`[^|]*\|.*\| ([\d,]+) \|$", readme, re.M))
    listed = run_cli("models").stdout.splitlines()
    presets = [(line.split()[0], line.split()[1]) for line in listed if line and line[0].isalpha() and "," in line]
    assert len(presets) > 20
    for name, count in presets:
        assert rows.get(name) == count, (name, count, rows.get(name))


def test_a_reader_that_stops_early_ends_vitlab_quietly():
    # `vitlab models | head -2`: the pipe closes while vitlab still writes (it builds each preset to
    # count its parameters): no traceback
    p = subprocess.Popen([sys.executable, "-m", "vitlab.cli", "models"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    first = p.stdout.readline()
    p.stdout.close()
    err = p.stderr.read()
    p.wait(timeout=120)
    assert first.startswith("name") and "Traceback" not in err and err == "", err


def test_what_a_resume_may_and_may_not_change():
    from vitlab.config import check_resume_config

    saved = build_config(None, parse_overrides(["--data", "imagefolder:/old/photos", "--epochs", "10"]))
    ok = build_config(None, parse_overrides(["--data", "imagefolder:photos", "--epochs", "20", "--lr", "1e-4",
                                             "--run.threads", "1"]))
    check_resume_config(saved, ok, "runs/x")  # the folder moved, more epochs, another lr: fine
    for flag, value, said in (("--optim.weight_decay", "0.3", "optim.weight_decay"), ("--data", "cifar10", "data.name"),
                              ("--model.num_classes", "10", "the run left it unset")):
        changed = build_config(None, parse_overrides(["--data", "imagefolder:/old/photos", flag, value]))
        with pytest.raises(ConfigError, match=said):
            check_resume_config(saved, changed, "runs/x")


def test_demo_checks_the_install_by_fitting_one_batch(capsys):
    assert cli.main(["demo", "--model", "vit_mini_patch4_32", "--steps", "6", "--batch-size", "16"]) == 0
    out = capsys.readouterr().out
    first, last = (float(x) for x in out.split("ok: the loss fell from ")[1].split(" to "))
    assert last < first
    assert cli.main(["demo", "--steps", "1"]) == 2


def test_list_keys_gives_each_keys_type_and_default(capsys):
    from vitlab.config import all_keys

    assert cli.main(["train", "--list-keys"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == all_keys()
    row = {ln.split()[0]: ln for ln in lines}
    assert row["optim.lr"].split()[1:] == ["float", "0.0003"]
    assert row["model.num_classes"].split()[1:] == ["int", "|", "None", "None"]
    assert cli.main(["finetune", "--list-keys"]) == 0  # finetune's defaults are its preset's
    row = {ln.split()[0]: ln for ln in capsys.readouterr().out.strip().splitlines()}
    assert row["run.epochs"].split()[1:] == ["int", "15"] and "'flowers102'" in row["data.name"]


def test_a_cuda_device_number_past_the_machines_is_one_line(monkeypatch):
    import torch

    from vitlab.errors import UserError
    from vitlab.train.engine import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a one-GPU machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(UserError, match="--device cuda:3: this machine has 1 CUDA device"):
        resolve_device("cuda:3", flag="--device")
    with pytest.raises(UserError, match="unknown device 'cuda:x' for --device"):
        resolve_device("cuda:x", flag="--device")
