"""Job specs: one declaration per parameter, validation a user can act on, JSON that round-trips."""
from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainer import jobs
from trainer.jobs import codegen
from trainer.jobs import fields as job_fields
from trainer.train import optim
from trainer.jobs import FIELDS, JOB_TYPES, MODES, CopierJob, DifferencePass, Field, JobError, LcmJob, PassSettings, StandardJob, job_from_dict, job_from_json, job_to_dict, job_to_json, json_schema, parameter_table_markdown, parse_optimizer_args, template, validate_paths
from trainer.jobs.vocabulary import BLOCK_IDS, TARGET_SETS

REPO = Path(__file__).resolve().parents[1]


def errors_of(make, **kwargs) -> dict[str, str]:
    with pytest.raises(JobError) as caught:
        make(**kwargs)
    return caught.value.errors


# --- one source of truth ---------------------------------------------------------------------

def test_each_field_declared_once():
    source = (REPO / "trainer" / "jobs" / "fields.py").read_text(encoding="utf-8")
    declared = [node.args[0].value for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Field"]
    assert sorted(declared) == sorted(FIELDS)
    assert len(declared) == len(set(declared))
    with pytest.raises(ValueError, match="declared twice"):
        job_fields._registry(FIELDS["lr"], FIELDS["lr"])


def test_every_job_attribute_is_a_registry_field_and_appears_once_per_job():
    for spec_type in (*JOB_TYPES.values(), PassSettings, DifferencePass):
        for f in dataclasses.fields(spec_type):
            if f.name in spec_type.parts:
                continue
            assert f.name in FIELDS, (spec_type.__name__, f.name)
        assert [f.name for f in dataclasses.fields(spec_type) if f.name not in spec_type.parts] == \
            [f.name for f in spec_type.spec_fields]
    copier_top = {f.name for f in dataclasses.fields(CopierJob)}
    pass_names = {f.name for f in dataclasses.fields(DifferencePass)}
    assert not copier_top & pass_names          # a copier setting lives either on the job or in the passes


def test_job_classes_are_generated_from_the_current_declarations():
    # job_types.py is what type checkers read; a field changed in fields.py without regenerating fails here
    assert codegen.TARGET.read_text(encoding="utf-8") == codegen.source(), "run python -m trainer.jobs.codegen"
    hints = {"lr": "float", "optimizer": "OptimizerName", "blocks": "list[str]", "overwrite": "bool"}
    for name, hint in hints.items():
        assert StandardJob.__annotations__[name] == hint


def test_choices_come_from_the_modules_that_implement_them():
    assert FIELDS["target_set"].choices == TARGET_SETS
    assert FIELDS["blocks"].choices == BLOCK_IDS
    assert FIELDS["optimizer"].choices == optim.OPTIMIZERS
    assert FIELDS["lr_scheduler"].choices == optim.LR_SCHEDULES


def test_every_field_has_help_a_group_and_a_valid_default_in_each_scope():
    for f in FIELDS.values():
        assert len(f.help) > 30 and f.group in jobs.GROUPS and f.label
    for mode in MODES:
        JOB_TYPES[mode]()                       # a default job of every mode is valid


def test_parameter_table_is_current():
    written = (REPO / "docs" / "parameters.md").read_text(encoding="utf-8")
    assert written == parameter_table_markdown(), "run: python -m trainer.jobs > docs/parameters.md"
    for name in FIELDS:
        assert f"| `{name}` |" in written


# --- validation ------------------------------------------------------------------------------

def test_negative_learning_rate_names_the_field():
    with pytest.raises(JobError) as caught:
        StandardJob(lr=-1)
    assert caught.value.field == "lr"
    assert caught.value.errors == {"lr": "learning rate must be > 0 (got -1)"}


def test_every_bad_field_is_reported_at_once():
    errors = errors_of(StandardJob, lr=0, steps=0, batch_size=0, caption_dropout=1.5, network_dim=0)
    assert set(errors) == {"lr", "steps", "batch_size", "caption_dropout", "network_dim"}
    assert errors["caption_dropout"] == "caption dropout must be <= 1 (got 1.5)"


@pytest.mark.parametrize("name", ["../evil", "a/b", "a\\b", "a..b", "", "   ", "CON", "nul.txt", "com1",
                                  "x" * 129, "what?", "a<b", 'say"hi"', "tab\there", "trailing.", " lead",
                                  ".hidden", "style.safetensors"])
def test_unsafe_output_names_are_refused(name):
    assert "name" in errors_of(StandardJob, name=name)


def test_output_name_with_dotdot_is_refused():
    assert errors_of(StandardJob, name="..")["name"] == "output name must not contain '..'"


@pytest.mark.parametrize("name", ["my_style-v2", "キャラ", "style 1.5", "a" * 128, "console"])
def test_ordinary_output_names_are_accepted(name):
    assert StandardJob(name=name).name == name


def test_alpha_far_above_dim_warns_not_fails():
    job = StandardJob(network_dim=4, network_alpha=32)
    assert job.network_alpha == 32.0
    assert "more than 4x the rank 4" in job.warnings["network_alpha"]
    assert StandardJob(network_dim=4, network_alpha=16).warnings == {}


def test_timestep_range_must_not_be_empty():
    assert "must be below the highest" in errors_of(StandardJob, timestep_min=600, timestep_max=600)["timestep_min"]
    assert StandardJob(timestep_min=200, timestep_max=800).timestep_max == 800
    assert "timestep_max" in errors_of(StandardJob, timestep_max=1001)


def test_resolution_must_be_a_multiple_of_64():
    assert errors_of(StandardJob, resolution=500)["resolution"] == \
        "resolution must be a multiple of 64 (got 500; nearest 512)"
    assert "resolution" in errors_of(StandardJob, resolution=0)
    assert StandardJob(resolution=64).resolution == 64


def test_misspelled_choice_suggests_the_right_spelling():
    assert "did you mean 'AdamW'" in errors_of(StandardJob, optimizer="adamw")["optimizer"]
    assert "did you mean 'cosine'" in errors_of(StandardJob, lr_scheduler="cosin")["lr_scheduler"]
    for field, bad in [("mixed_precision", "fp32"), ("save_precision", "fp8"), ("prediction", "x0"),
                       ("target_set", "everything")]:
        assert field in errors_of(StandardJob, **{field: bad})


def test_unknown_block_id_lists_the_valid_ones():
    message = errors_of(StandardJob, blocks=["IN04", "IN99"])["blocks"]
    assert "'IN99'" in message and "OUT11" in message
    assert StandardJob(blocks=["BASE", "OUT03"], train_text_encoder=True).blocks == ["BASE", "OUT03"]


def test_conv_rank_needs_the_target_set_that_has_convolutions():
    assert "'all'" in errors_of(StandardJob, conv_dim=8)["conv_dim"]
    assert StandardJob(conv_dim=8, conv_alpha=4, target_set="all").conv_dim == 8


def test_values_are_typed_strictly_but_whole_floats_count_as_ints():
    assert StandardJob(steps=1000.0).steps == 1000 and isinstance(StandardJob(lr=1).lr, float)
    assert errors_of(StandardJob, steps=True)["steps"] == "steps must be a whole number (got True)"
    assert errors_of(StandardJob, steps=2.5)["steps"] == "steps must be a whole number (got 2.5)"
    assert "list of text" in errors_of(StandardJob, blocks="IN04")["blocks"]
    assert "finite" in errors_of(StandardJob, lr=float("nan"))["lr"]


def test_warmup_must_be_shorter_than_training():
    assert "lr_warmup_steps" in errors_of(StandardJob, steps=100, lr_warmup_steps=100)
    assert "constant_with_warmup" in StandardJob(lr_warmup_steps=10).warnings["lr_warmup_steps"]


def test_optimizer_args_are_parsed_to_typed_values():
    assert parse_optimizer_args("weight_decay=0.01 betas=0.9,0.999 decouple=True d_coef=2") == \
        {"weight_decay": 0.01, "betas": (0.9, 0.999), "decouple": True, "d_coef": 2}
    assert "key=value" in errors_of(StandardJob, optimizer_args="weight_decay 0.01")["optimizer_args"]


def test_jobs_are_frozen_and_replace_revalidates():
    job = StandardJob()
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.lr = 1.0
    with pytest.raises(JobError):
        dataclasses.replace(job, lr=-1)


# --- modes -----------------------------------------------------------------------------------

def test_lcm_defaults_are_the_lcm_lora_recipe():
    """diffusers' train_lcm_distill_lora_sd_wds.py: rank 64, alpha 64, every conv and linear layer of the UNet,
    AdamW (weight decay 0.01) at a constant 1e-4, N = 50, w drawn from [3, 15] (CFG 4-16), pseudo-Huber c 0.001."""
    job = LcmJob()
    assert (job.target_set, job.network_dim, job.network_alpha, job.conv_dim, job.conv_alpha) == ("all", 64, 64.0, 64, 64.0)
    assert (job.lr, job.optimizer, job.optimizer_args, job.lr_scheduler) == (1e-4, "AdamW", "", "constant")
    assert (job.num_ddim_timesteps, job.guidance_scale, job.guidance_scale_max) == (50, 3.0, 15.0)
    assert (job.loss_type, job.huber_c, job.use_ema_target, job.ema_decay) == ("huber", 0.001, False, 0.95)
    assert StandardJob().conv_alpha == 1.0 and StandardJob().target_set == "attn_mlp", "other modes keep theirs"
    assert "guidance_scale_max" in errors_of(LcmJob, guidance_scale=8, guidance_scale_max=4)


def test_copier_pass2_reuses_pass1_training_but_keeps_its_own_network():
    job = CopierJob(copier_pass={"lr": 1e-3, "steps": 300, "batch_size": 4})
    first, second = job.passes()
    assert (first.network_dim, first.network_alpha) == (16, 16.0)
    assert (second.network_dim, second.network_alpha) == (8, 8.0)
    assert (second.lr, second.steps, second.batch_size) == (1e-3, 300, 4)
    own = CopierJob(difference_pass={"same_as_pass1": False, "lr": 2e-4}).passes()[1]
    assert own.lr == 2e-4


def test_copier_passes_accept_settings_objects_or_dicts():
    job = CopierJob(copier_pass=PassSettings(lr=1e-3), difference_pass=PassSettings(network_dim=4))
    assert type(job.difference_pass) is DifferencePass and job.difference_pass.same_as_pass1
    assert job_from_dict(job_to_dict(job)) == job
    assert "copier_pass" in errors_of(CopierJob, copier_pass=5)


def test_copier_pass_errors_are_named_with_their_pass():
    errors = errors_of(job_from_dict, data={"mode": "copier", "copier_pass": {"lr": 0},
                                            "difference_pass": {"network_dim": 0}})
    assert set(errors) == {"copier_pass.lr", "difference_pass.network_dim"}


def test_per_pass_setting_at_copier_top_level_points_into_the_passes():
    assert "copier_pass" in errors_of(job_from_dict, data={"mode": "copier", "lr": 1e-4})["lr"]


def test_copier_pairs_must_match():
    errors = errors_of(CopierJob, image_a=["a.png", "b.png"], image_b=["a2.png"])
    assert errors["image_b"].startswith("2 image(s) A but 1 image(s) B")


# --- JSON --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_template_round_trips_through_json(mode):
    text = json.dumps(template(mode))
    job = job_from_json(text)
    assert type(job) is JOB_TYPES[mode]
    assert job_to_dict(job) == template(mode)
    assert json.loads(job_to_json(job)) == template(mode)


def test_template_is_complete():
    data = template("copier")
    assert (data["schema"], data["mode"]) == (1, "copier")
    top_level = {f.name for f in jobs.fields_for("copier")}
    assert set(data) == {"schema", "mode", "copier_pass", "difference_pass"} | top_level
    assert data["difference_pass"]["same_as_pass1"] is True


def test_missing_keys_take_defaults():
    job = job_from_json('{"schema": 1, "mode": "standard", "lr": 0.0002}')
    assert job.lr == 2e-4 and job.steps == FIELDS["steps"].default


def test_unknown_key_in_json_is_named():
    with pytest.raises(JobError) as caught:
        job_from_json('{"mode": "standard", "lr": 0.0001, "learning_rate": 0.0001, "colour": 1}')
    assert set(caught.value.errors) == {"learning_rate", "colour"}
    assert "did you mean 'lr'" in caught.value.errors["learning_rate"]      # kohya's name for it
    assert "it belongs to lcm" in errors_of(job_from_dict, data={"mode": "standard", "huber_c": 0.1})["huber_c"]


def test_wrong_type_in_json_names_the_field():
    assert errors_of(job_from_json, text='{"mode": "standard", "steps": "many"}') == \
        {"steps": "steps must be a whole number (got 'many')"}


def test_newer_schema_is_refused_clearly():
    with pytest.raises(JobError, match="newer LoRA Queue") as caught:
        job_from_json('{"schema": 2, "mode": "lcm"}')
    assert caught.value.field == "schema"


def test_missing_or_unknown_mode_and_broken_json_are_explained():
    assert errors_of(job_from_json, text='{"schema": 1}') == \
        {"mode": f"mode must be one of {', '.join(MODES)} (got None)"}
    with pytest.raises(JobError, match="not valid JSON"):
        job_from_json('{"mode": ')


def test_json_schema_describes_every_field():
    schema = json_schema("copier")
    props = schema["properties"]
    assert props["mode"] == {"const": "copier"} and schema["additionalProperties"] is False
    assert props["copier_pass"]["properties"]["lr"]["exclusiveMinimum"] == 0
    assert props["difference_pass"]["properties"]["network_dim"]["default"] == 8
    assert props["image_a"]["type"] == "array"
    lcm = json_schema("lcm")["properties"]
    assert lcm["network_dim"]["default"] == 64 and lcm["loss_type"]["enum"] == ["huber", "l2"]


# --- paths and CLI -----------------------------------------------------------------------------

def test_validate_paths_reports_missing_and_wrong_kind(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    assert validate_paths(StandardJob(), root=tmp_path) == {"dataset_dir": "dataset folder is required"}
    problems = validate_paths(StandardJob(dataset_dir="a.png", init_lora="missing.safetensors"), root=tmp_path)
    assert problems == {"dataset_dir": "dataset folder 'a.png' is a file, not a folder",
                        "init_lora": "start from LoRA 'missing.safetensors' does not exist"}
    assert validate_paths(StandardJob(dataset_dir=str(tmp_path), model="demo")) == {}
    copier = CopierJob(image_a=["a.png"], image_b=["b.png"])
    assert validate_paths(copier, root=tmp_path) == {"image_b": "image B 'b.png' does not exist"}
    assert "dataset_dir" in validate_paths(LcmJob(), root=tmp_path)
    assert validate_paths(LcmJob(prompts=["a cat"]), root=tmp_path) == {}


def test_template_cli_prints_a_copier_job():
    result = subprocess.run([sys.executable, "-m", "trainer", "template", "copier"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data == template("copier")
    assert type(job_from_dict(data)) is CopierJob


def test_template_cli_registers_as_a_subcommand(tmp_path, capsys):
    import argparse

    from trainer.cli import template as template_cli

    parser = argparse.ArgumentParser(prog="trainer")
    template_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["template", "lcm", "-o", str(tmp_path / "job.json")])
    assert args.func(args) == 0
    assert json.loads((tmp_path / "job.json").read_text())["mode"] == "lcm"
    args = parser.parse_args(["template", "standard", "--schema"])
    assert template_cli.run(args) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "LoRA Queue standard job"


def test_field_declaration_rejects_unknown_modes_and_groups():
    with pytest.raises(ValueError, match="unknown"):
        job_fields._registry(Field("x", int, 0, "x", "an example field that has enough help text", "nope"))


def test_the_ss_metadata_of_a_run_comes_from_the_field_declarations():
    from trainer.train.plan import network_shape, settings_metadata

    job = CopierJob(image_b=["b.png"], mixed_precision="fp16",
                    difference_pass=dict(network_dim=32, network_alpha=8.0, lr=3e-4, same_as_pass1=False))
    _, second = job.passes()
    meta = settings_metadata(job, second)
    assert meta["ss_learning_rate"] == "0.0003" and meta["ss_mixed_precision"] == "fp16"
    assert meta["ss_max_train_steps"] == str(second.steps) and meta["ss_batch_size_per_device"] == str(second.batch_size)
    assert set(meta) == {f.metadata_key for f in (*job.spec_fields, *second.spec_fields) if f.metadata_key}
    # network_dim keeps its name from the field to the shape; the file writes it as ss_network_dim
    assert network_shape(second).network_dim == 32


def test_an_emptied_number_field_says_it_is_empty_and_what_to_enter():
    with pytest.raises(jobs.JobError) as e:
        jobs.job_from_dict({"mode": "standard", "steps": None, "lr": None})
    assert "is empty: enter a whole number (default" in e.value.errors["steps"]
    assert "is empty: enter a number" in e.value.errors["lr"] and "None" not in e.value.errors["lr"]


def test_a_sweep_gives_one_named_valid_job_per_combination_and_is_refused_as_a_whole():
    base = jobs.StandardJob(name="style", lr=1e-4, network_alpha=4.0)
    sweep = jobs.parse_sweep("lr=5e-5,1e-4,2e-4; network_alpha=2,4,8")
    made = jobs.sweep_jobs(base, sweep)
    assert len(made) == 9 and len({j.name for j in made}) == 9
    assert {(j.lr, j.network_alpha) for j in made} == {(a, b) for a in (5e-5, 1e-4, 2e-4) for b in (2.0, 4.0, 8.0)}
    assert made[0].name == "style_lr5e-05_network_alpha2.0"
    copier = jobs.sweep_jobs(jobs.CopierJob(name="c"), jobs.parse_sweep("difference_pass.network_dim=4,8"))
    assert [j.difference_pass.network_dim for j in copier] == [4, 8]
    with pytest.raises(jobs.JobError, match="network_dim"):
        jobs.sweep_jobs(base, jobs.parse_sweep("network_dim=4,0"))     # rank 0: the whole sweep is refused
    for bad in ("lr", "bogus=1", "lr=abc", "sample_prompts=a,b"):
        with pytest.raises(jobs.JobError):
            jobs.parse_sweep(bad)
