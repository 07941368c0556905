"""What the platform executes comes from the operator's deployment settings, never from run config:
a run config that sets the trainer's launcher, hosts or node start command is refused by the job's
config schema before anything runs; the settings work from the environment and from the deployment
file; a deployment file (or hostfile) that someone else could change is refused, naming its path.
Touches the session's PostgreSQL (a database of this test's own, for dg.materialize) and files
under tmp_path; no process is started."""

import os

import dagster as dg
import pytest

from assets.prompts import prompt_set
from assets.training import base_model, finetuned_checkpoint
from llmops_dagster.definitions import defs
from llmops_dagster.infra.settings import DEPLOYMENT_FILE_ENV, SettingError
from llmops_dagster.training import launch
from llmops_dagster.training.launch import DEPLOYMENT_ENV, TrainingDeployment, training_deployment
from resources.trainer import TrainerResource

# The reproduction: a launchpad run config that ran `id` as the platform's user.
PROOF_COMMAND = ["sh", "-c", "id > proof.txt; exit 3", "--"]
REPRODUCTION = {"resources": {"trainer": {"config": {"node_start_command": PROOF_COMMAND}}}}
WITH_NODES = {"resources": {"trainer": {"config": {"nodes": 2, "node_start_command": PROOF_COMMAND}}}}


@pytest.fixture
def no_deployment(tmp_path, monkeypatch):
    """No trainer setting in the environment and LLMOPS_HOME in an empty folder of this test."""
    for variable in [*DEPLOYMENT_ENV.values(), DEPLOYMENT_FILE_ENV]:
        monkeypatch.delenv(variable, raising=False)
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("LLMOPS_HOME", str(home))
    return home


@pytest.mark.parametrize("run_config", [REPRODUCTION, WITH_NODES], ids=["command", "command-and-nodes"])
def test_a_command_in_run_config_is_refused_before_anything_runs(run_config, resources, instance,
                                                                  tmp_path, monkeypatch, no_deployment):
    monkeypatch.chdir(tmp_path)
    for job in ("retrain", "main"):  # what the launchpad and the sensors launch
        with pytest.raises(dg.DagsterInvalidConfigError, match="node_start_command"):
            dg.validate_run_config(defs.resolve_job_def(job), run_config)
    with pytest.raises(dg.DagsterInvalidConfigError, match="node_start_command") as refused:
        dg.materialize([finetuned_checkpoint, prompt_set, base_model], selection=[finetuned_checkpoint],
                       resources={**resources, "trainer": TrainerResource()}, instance=instance,
                       run_config=run_config)
    assert "root:resources:trainer:config" in str(refused.value)
    assert instance.get_runs() == []  # refused at launch: no run was even created
    # `llmops run --config` and any other client: the library names the setting and where it goes.
    with pytest.raises(launch.TrainingConfigError) as named:
        launch.refuse_deployment_settings(run_config)
    message = str(named.value)
    assert "trainer.node_start_command is a deployment setting" in message
    assert "LLMOPS_TRAINER_NODE_START_COMMAND" in message and "deployment.toml" in message
    assert ("LLMOPS_TRAINER_NODES" in message) == ("nodes" in run_config["resources"]["trainer"]["config"])
    assert list(tmp_path.rglob("proof.txt")) == []


def test_run_config_without_deployment_settings_passes():
    launch.refuse_deployment_settings({"resources": {"trainer": {"config": {"threads_per_rank": 2}}}})
    launch.refuse_deployment_settings({})
    launch.refuse_deployment_settings(None)
    validated = dg.validate_run_config(defs.resolve_job_def("retrain"), {
        "resources": {"trainer": {"config": {"threads_per_rank": 2}}}})
    assert validated["resources"]["trainer"]["config"] == {"threads_per_rank": 2}


def test_the_settings_come_from_the_environment_over_the_deployment_file(no_deployment, tmp_path,
                                                                         monkeypatch):
    assert training_deployment() == TrainingDeployment()  # nothing set: one node here, torchrun
    (no_deployment / "deployment.toml").write_text(
        '[trainer]\nnodes = 2\nrendezvous_endpoint = "10.0.0.1:29650"\n'
        'node_start_command = ["srun", "--nodes=1", "--relative={node_rank}"]\n')
    assert training_deployment() == TrainingDeployment(
        nodes=2, rendezvous_endpoint="10.0.0.1:29650",
        node_start_command=("srun", "--nodes=1", "--relative={node_rank}"))
    run_file = tmp_path / "train_config.json"
    with TrainerResource().node_launches(run_file, 4) as nodes:
        assert [n.command[:3] for n in nodes[1:]] == [["srun", "--nodes=1", "--relative=1"]]
        assert "--rdzv-endpoint=10.0.0.1:29650" in nodes[0].command

    monkeypatch.setenv(DEPLOYMENT_ENV["node_start_command"], "ssh -tt 'gpu {node_rank}'")
    monkeypatch.setenv(DEPLOYMENT_ENV["nodes"], "4")
    deployment = training_deployment()
    assert (deployment.nodes, deployment.node_start_command) == (4, ("ssh", "-tt", "gpu {node_rank}"))
    assert deployment.rendezvous_endpoint == "10.0.0.1:29650"  # still from the file

    other = tmp_path / "ops" / "llmops.toml"  # named by LLMOPS_DEPLOYMENT_FILE: wins over LLMOPS_HOME
    other.parent.mkdir(mode=0o755)
    other.write_text('[trainer]\nlauncher = "deepspeed"\n')
    monkeypatch.setenv(DEPLOYMENT_FILE_ENV, str(other))
    assert training_deployment().launcher == "deepspeed"
    assert training_deployment().rendezvous_endpoint == ""


@pytest.mark.parametrize(("content", "error"), [
    ('[trainer]\nnode_count = 2\n', r"unknown settings \['node_count'\]"),
    ('[trainer]\nlauncher = "bash"\n', r"`launcher` in \[trainer\] of .*deployment.toml must be one of"),
    ('[trainer]\nnodes = 0\n', "at least 1"),
    ('[trainer]\nnode_start_command = "srun"\n', None),  # a string is split as a shell would
])
def test_a_bad_deployment_file_names_the_setting_and_the_file(no_deployment, content, error):
    (no_deployment / "deployment.toml").write_text(content)
    if error is None:
        assert training_deployment().node_start_command == ("srun",)
        return
    with pytest.raises(SettingError, match=error):
        training_deployment()


def test_a_deployment_file_others_can_change_is_refused(no_deployment, tmp_path, monkeypatch):
    path = no_deployment / "deployment.toml"
    path.write_text('[trainer]\nnodes = 2\nnode_start_command = ["srun"]\n')
    for mode, problem in ((0o664, "group-writable"), (0o646, "world-writable")):
        path.chmod(mode)
        with pytest.raises(SettingError, match=f"{path} \\(file of deployment.toml\\) is {problem}"):
            training_deployment()
        with pytest.raises(dg.Failure, match=str(path)):  # as the fine-tune step meets it
            TrainerResource().nodes  # noqa: B018
    path.chmod(0o644)
    assert training_deployment().nodes == 2

    os.chown(path, 65534, 65534)  # another user's file (the tests run as root here)
    with pytest.raises(SettingError, match="is owned by uid 65534"):
        training_deployment()
    os.chown(path, os.geteuid(), os.getegid())

    no_deployment.chmod(0o777)  # anyone could replace the file in its folder
    with pytest.raises(SettingError, match=f"{no_deployment} \\(folder of deployment.toml\\) is "
                                           "group-writable and world-writable"):
        training_deployment()
    no_deployment.chmod(0o1777)  # sticky, as /tmp: only the file's owner can replace it
    assert training_deployment().nodes == 2
    no_deployment.chmod(0o700)

    hostfile = tmp_path / "hostfile"  # the deepspeed launcher runs commands on the hosts it names
    hostfile.write_text("gpu-0 slots=8\n")
    hostfile.chmod(0o666)
    monkeypatch.setenv(DEPLOYMENT_ENV["hostfile"], str(hostfile))
    with pytest.raises(SettingError, match=f"LLMOPS_TRAINER_HOSTFILE: {hostfile} .* world-writable"):
        training_deployment()
    hostfile.chmod(0o600)
    assert training_deployment().hostfile == str(hostfile)


def test_a_deepspeed_config_is_a_shipped_one_or_the_operators(no_deployment, tmp_path, monkeypatch):
    """A DeepSpeed config says where DeepSpeed writes (monitors, profiler, NVMe offload): run config
    names a shipped one or a file in the operator's folder, never any path."""
    assert launch.load_deepspeed_config("cpu_zero2")["zero_optimization"]["stage"] == 2
    anywhere = tmp_path / "mine.json"
    anywhere.write_text('{"csv_monitor": {"enabled": true, "output_path": "/etc/cron.d"}}')
    for name in (str(anywhere), "../" * 8 + str(anywhere), "mine"):
        with pytest.raises(launch.TrainingConfigError, match="LLMOPS_TRAINER_DEEPSPEED_CONFIG_DIR"):
            launch.load_deepspeed_config(name)
    folder = tmp_path / "deepspeed"
    folder.mkdir(mode=0o755)
    (folder / "big.json").write_text('{"zero_optimization": {"stage": 3}}')
    monkeypatch.setenv(DEPLOYMENT_ENV["deepspeed_config_dir"], str(folder))
    for name in ("big", "big.json", str(folder / "big.json")):
        assert launch.load_deepspeed_config(name)["zero_optimization"]["stage"] == 3
    with pytest.raises(launch.TrainingConfigError, match=f"nor a file in {folder}"):
        launch.load_deepspeed_config(str(anywhere))  # outside the folder
    (folder / "escape.json").symlink_to(anywhere)
    with pytest.raises(launch.TrainingConfigError, match="nor a file in"):
        launch.load_deepspeed_config("escape")
    (folder / "big.json").chmod(0o666)
    with pytest.raises(launch.TrainingConfigError, match="world-writable"):
        launch.load_deepspeed_config("big")
