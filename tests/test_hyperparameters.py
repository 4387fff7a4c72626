"""Hyperparameters: CLI flags generated from the dataclass, SageMaker's argument forms, every field used."""

from __future__ import annotations

import argparse
import ast
from dataclasses import fields
from pathlib import Path

import pytest

from brainseg.commands import train
from brainseg.config import STREAM_FLAGS, Hyperparameters
from brainseg.environment import cpu_image_warning, read_environment
from brainseg.flags import FLAG_GROUPS, build_parser, parse_hyperparameters, validate_overrides
from brainseg.stream_config import StreamConfig, check_budget

REQUIRED = ["--data-uri", "s3://data/set/", "--output-uri", "s3://out/runs/"]
ENTRY_POINT = Path(__file__).resolve().parents[1] / "entry_point"


def test_flags_in_both_spellings_with_lists_and_booleans():
    hp, ignored = parse_hyperparameters(REQUIRED + [
        "--patch-size", "64,64,32", "--slab_margin", "[8, 4]", "--augment", "false", "--compile", "True",
        "--lr", "3e-4", "--model", "dynunet", "--channels", "[8,16,32]"])
    assert hp.patch_size == (64, 64, 32) and hp.slab_margin == (8, 4) and hp.channels == (8, 16, 32)
    assert hp.augment is False and hp.compile is True and hp.lr == 3e-4 and hp.model == "dynunet"
    assert ignored == []


def test_only_sagemakers_own_arguments_are_tolerated():
    hp, ignored = parse_hyperparameters(REQUIRED + ["--sagemaker_program", "train.py", "--epochs", "3",
                                                    "--_tuning_objective_metric=validation:dice"])
    assert hp.epochs == 3 and ignored == ["--sagemaker_program", "train.py", "--_tuning_objective_metric=validation:dice"]


@pytest.mark.parametrize("argv, message", [
    (["--lrr", "0.1"], r"unknown flag --lrr; did you mean --lr\?"),
    (["--epoch", "3"], r"unknown flag --epoch; did you mean --epochs\?"),  # no silent abbreviations
    (["--learning_rate=0.1"], r"unknown flag --learning_rate; did you mean --lr\? \(train.py --help"),
    (["--learning-rate", "0.1"], r"unknown flag --learning-rate; did you mean --lr\?"),
    (["--max_epochs", "3"], r"unknown flag --max_epochs; did you mean --epochs\?"),
    (["--roi-size", "64,64,64"], r"unknown flag --roi-size; did you mean --patch-size\?"),
    (["stray"], r"unexpected argument 'stray'"),
])
def test_unknown_flags_stop_with_the_closest_one(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_hyperparameters(REQUIRED + argv)


@pytest.mark.parametrize("fields_, message", [
    (dict(data_uri="s3://b/ds/", output_uri="s3://b/ds/runs/"), "output_uri s3://b/ds/runs/ is inside data_uri"),
    (dict(data_uri="s3://b/", output_uri="s3://b/runs/"), "output_uri s3://b/runs/ is inside data_uri s3://b/"),
    (dict(data_uri="s3://b/ds/", index_uri="s3://b/ds/case_1/index.jsonl"), "but not under its .brainseg/ folder"),
    (dict(memory_budget_mb=64, num_workers=4), r"--memory-budget-mb 64 gives each of 4 DataLoader worker\(s\) 16 MiB, "
                                               r"but one slab needs 28 MiB; raise --memory-budget-mb to at least 114"),
])
def test_locations_and_budget_are_checked_before_anything_runs(fields_, message):
    with pytest.raises(ValueError, match=message):
        Hyperparameters(**fields_)
    Hyperparameters(**{**fields_, **({"memory_budget_mb": 128} if "memory_budget_mb" in fields_ else {}),
                       **({"output_uri": "s3://other/runs/"} if "output_uri" in fields_ else {}),
                       **({"index_uri": "s3://b/ds/.brainseg/index.jsonl"} if "index_uri" in fields_ else {})})


@pytest.mark.parametrize("argv, message", [
    (["--model", "vnet"], "model 'vnet': expected one of unet, attention_unet, segresnet, dynunet"),
    (["--patch-size", "96,96"], r"patch_size \(96, 96\): expected three positive sizes"),
    (["--dropout", "1.5"], r"dropout 1.5: expected a value in \[0, 1\)"),
    (["--batch-size", "0"], "batch_size 0: expected at least 1"),
    (["--run-name", "a b"], "run_name 'a b'"),
    (["--sequence-dropout", "1.5", "--sequences", "t1c,flair"], r"sequence_dropout 1.5: expected a value in \[0, 1\]"),
    (["--sequence-dropout", "0.3"], r"sequence_dropout 0.3 with sequences 'image' and augment True: expected at least two"),
    (["--sequence-dropout", "0.3", "--sequences", "t1c,flair", "--augment", "false"], "and --augment true"),
    (["--sequence-dropout", "0.3", "--sequences", "t1c,flair", "--sequence-dropout-among", "t2"],
     "sequence_dropout_among 't2': expected distinct names among the sequences 't1c,flair'"),
    (["--sequence-dropout", "0.3", "--sequences", "t1c,flair", "--sequence-dropout-among", "flair,flair"],
     "sequence_dropout_among 'flair,flair'"),
])
def test_bad_values_name_the_field_and_what_was_expected(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_hyperparameters(REQUIRED + argv)


def test_unparseable_values_and_missing_uris_stop_argparse(capsys):
    with pytest.raises(SystemExit):
        parse_hyperparameters(REQUIRED + ["--augment", "maybe"])
    assert "'maybe': expected true or false" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_hyperparameters(["--output-uri", "s3://out/"])
    assert "--data-uri" in capsys.readouterr().err


def test_help_groups_every_flag_once_and_shows_booleans_as_true_or_false():
    groups = [name for names in FLAG_GROUPS.values() for name in names]
    assert sorted(groups) == sorted(f.name for f in fields(Hyperparameters))
    text = build_parser().format_help()
    titles = [title for title in FLAG_GROUPS if f"\n{title}:\n" in text]
    assert titles == list(FLAG_GROUPS) == ["data", "sequences and labels", "model", "optimisation", "patches",
                                           "evaluation", "checkpoints and tracking", "advanced"]
    assert text.index("\ndata:\n") < text.index("  --data-uri URI") < text.index("\nmodel:\n") < text.index("  --channels")
    assert "--data_uri" not in text and "--patch_size" not in text and text.count("--patch-size D,H,W") == 1
    assert "--augment true|false" in text and "(default: true)" in text and "--snake_case" in text


def test_snake_case_flags_are_accepted_as_sagemaker_passes_them():
    hp, _ = parse_hyperparameters(["--data_uri", "s3://in/ds/", "--output_uri", "s3://out/", "--patch_size", "32,32,32",
                                   "--steps-per-epoch", "7"])
    assert hp.data_uri == "s3://in/ds/" and hp.patch_size == (32, 32, 32) and hp.steps_per_epoch == 7


def test_train_py_reports_a_bad_flag_on_stderr_in_one_line(capsys):
    assert train.main(REQUIRED + ["--learning-rate", "0.1"]) == 2
    captured = capsys.readouterr()
    assert captured.err == ("train.py: error: unknown flag --learning-rate; did you mean --lr? (train.py --help lists "
                            "every flag)\n")
    assert "learning-rate" not in captured.out


def test_patch_sizes_the_network_cannot_halve_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"patch_size \(100, 100, 100\): with 5 levels .* multiple of 16; change "
                                         "patch_size or channels"):
        validate_overrides({"patch_size": "100,100,100"})
    assert validate_overrides({"patch_size": "100,100,100", "channels": "8,16,32"}).patch_size == (100, 100, 100)


def test_uris_must_be_s3():
    with pytest.raises(ValueError, match="data_uri '/data': expected an s3:// URI"):
        Hyperparameters(data_uri="/data")


def test_overrides_are_validated_for_launchers():
    assert validate_overrides({"epochs": "7", "augment": "false", "patch_size": "32,32,32"}).patch_size == (32, 32, 32)
    with pytest.raises(ValueError, match=r"unknown hyperparameter epochz; did you mean --epochs\?"):
        validate_overrides({"epochz": "1"})
    with pytest.raises(ValueError, match="hyperparameter epochs='many'"):
        validate_overrides({"epochs": "many"})


def test_the_stream_settings_are_declared_once():
    stream = {spec.name: spec for spec in fields(StreamConfig)}
    flags = {spec.name: spec for spec in fields(Hyperparameters)}
    assert set(stream) == {*STREAM_FLAGS, "memory_budget_bytes", "seed", "sequence_dropout_channels"}
    for name in STREAM_FLAGS:
        assert flags[name].default == stream[name].default and flags[name].metadata == stream[name].metadata, name
    assert Hyperparameters().stream_config() == StreamConfig()


def test_stream_config_carries_the_stream_fields():
    hp = Hyperparameters(patch_size=(32, 48, 64), memory_budget_mb=64, mix_slabs=3, seed=9)
    config = hp.stream_config()
    assert config.patch_size == (32, 48, 64) and config.memory_budget_bytes == 64 * 2**20
    assert config.mix_slabs == 3 and config.seed == 9 and config.sequence_dropout_channels == ()
    among = Hyperparameters(sequences="t1c,t1,t2,flair", sequence_dropout=0.5, sequence_dropout_among="flair, t1")
    assert among.stream_config().sequence_dropout_channels == (3, 1)


def _hp_attributes() -> set[str]:
    """Every ``hp.<name>`` / ``self.hp.<name>`` read in the entry point outside the config module."""
    used = set()
    for path in ENTRY_POINT.rglob("*.py"):
        if path.name == "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                owner = node.value
                if (isinstance(owner, ast.Name) and owner.id == "hp") or (
                        isinstance(owner, ast.Attribute) and owner.attr == "hp"):
                    used.add(node.attr)
    return used


def _stream_config_attributes() -> set[str]:
    """The fields ``Hyperparameters.stream_config`` hands to the patch stream: those it reads as
    ``self.<name>`` and, when it hands them over by name, every one of :data:`STREAM_FLAGS`."""
    tree = ast.parse((ENTRY_POINT / "brainseg" / "config.py").read_text())
    method = next(node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == "stream_config")
    read = {node.attr for node in ast.walk(method)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"}
    by_name = any(isinstance(node, ast.Name) and node.id == "STREAM_FLAGS" for node in ast.walk(method))
    return read | (set(STREAM_FLAGS) if by_name else set())


DERIVED = {"sequence_names": "sequences", "sequence_dropout_names": "sequence_dropout_among"}  # properties of Hyperparameters and the field each one reads


def test_every_field_is_used():
    used = {DERIVED.get(name, name) for name in _hp_attributes() | _stream_config_attributes()}
    unused = {f.name for f in fields(Hyperparameters)} - used
    assert not unused, f"hyperparameters never read by the training code: {sorted(unused)}"


def test_environment_reads_sagemaker_variables(tmp_path):
    env = read_environment({"SM_MODEL_DIR": "/opt/ml/model", "SM_OUTPUT_DATA_DIR": "/opt/ml/output/data",
                            "SM_HOSTS": '["algo-1", "algo-2"]', "SM_CURRENT_HOST": "algo-2", "SM_NUM_GPUS": "4",
                            "SM_TRAINING_ENV": '{"job_name": "brainseg-2026"}',
                            "SM_CHECKPOINT_DIR": str(tmp_path)})
    assert env.model_dir == "/opt/ml/model" and env.hosts == ("algo-1", "algo-2") and env.current_host == "algo-2"
    assert env.num_gpus == 4 and env.job_name == "brainseg-2026" and env.checkpoint_dir == str(tmp_path)


def test_environment_falls_back_outside_sagemaker():
    env = read_environment({})
    assert env.model_dir == "model" and env.job_name is None and env.hosts == ("localhost",)


def test_help_describes_every_flag():
    parser = build_parser()
    shown = [action for action in parser._actions if action.dest != "help" and action.help != argparse.SUPPRESS]
    documented = {action.dest: action.help for action in shown}
    assert set(documented) == {spec.name for spec in fields(Hyperparameters)} and len(shown) == len(documented)
    for name, text in documented.items():
        assert text and len(text.split("(default")[0].strip()) > 10, (name, text)
    assert {action.dest: action.metavar for action in shown}["model"] == "unet|attention_unet|segresnet|dynunet"
    assert "(default: 96,96,96)" in documented["patch_size"]


@pytest.mark.parametrize("budget_mb, workers, needed_mb, slabs", [(64, 4, 10, 1), (64, 2, 10, 3), (64, 0, 16, 4)])
def test_the_budget_is_divided_among_the_workers_in_one_place(budget_mb, workers, needed_mb, slabs):
    assert check_budget(budget_mb * 2**20, workers, needed_mb * 2**20) == slabs


def test_a_budget_too_small_names_the_flag_and_the_least_that_fits():
    with pytest.raises(ValueError, match=r"^--memory-budget-mb 64 gives each of 8 DataLoader worker\(s\) 8 MiB, but one "
                                         r"slab needs 10 MiB; raise --memory-budget-mb to at least 80, or lower"):
        check_budget(64 * 2**20, 8, 10 * 2**20)


def test_the_label_scheme_is_parsed_once_per_run_and_shared():
    from brainseg.tasks import task_of

    hp = Hyperparameters(labels="ncr=1,ed=2,et=4", regions="brats")
    assert hp.label_scheme is hp.label_scheme and task_of(hp).scheme is hp.label_scheme
    assert hp.label_scheme.names == ("wt", "tc", "et")
    assert hp == Hyperparameters(labels="ncr=1,ed=2,et=4", regions="brats")  # the cache is no field


def test_a_cuda_build_that_sees_no_gpu_on_a_gpu_instance_is_blamed_on_the_driver():
    env = read_environment({"SM_NUM_GPUS": "1"})
    driver = cpu_image_warning(env, False, "2.13.0+cu130", "13.0")
    assert driver.startswith("SM_NUM_GPUS=1 but torch 2.13.0+cu130, built for CUDA 13.0, sees no CUDA device: the "
                             "host's NVIDIA driver is likely older than CUDA 13.0 needs (13.x: R580 or later")
    assert "TORCH_INDEX=https://download.pytorch.org/whl/cu126" in driver and "CPU image" not in driver
    assert "a CPU image (or a CPU build of torch)" in cpu_image_warning(env, False, "2.13.0+cpu", None)
    assert cpu_image_warning(env, True, "2.13.0+cu130", "13.0") == ""
