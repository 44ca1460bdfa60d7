"""Checkpoints through ``tools/``: a run killed (SIGKILL) mid-run or in the middle of writing a
checkpoint resumes to the uninterrupted run's weights and loss curve, bit for bit, also when
training draws random numbers (visual prompts, region order, mask subsets: the checkpoint holds
the generators' states); mmengine's own ``CheckpointHook`` loses the previous checkpoint in the
same kill, and does not continue a random run; ``tools/test.py`` refuses a checkpoint of another
config, naming the keys."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

import pytest
import torch

from groma_px.engine import tiny_runs
from groma_px.engine.checkpoint import PARTIAL_SUFFIX

ITERS = 6
INTERVAL = 2

CRASH_HOOKS = tiny_runs.SIGKILL_HOOK_SOURCE + textwrap.dedent(
    """

    from mmengine.fileio.backends import LocalBackend

    _put = LocalBackend.put


    def _put_half_then_die(self, obj, filepath):
        # SIGKILL half-way through writing a file whose name contains $SIGKILL_WHILE_SAVING.
        name = os.environ.get("SIGKILL_WHILE_SAVING")
        if not name or name not in os.path.basename(str(filepath)):
            return _put(self, obj, filepath)
        with open(filepath, "wb") as f:
            f.write(obj[: len(obj) // 2])
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)


    LocalBackend.put = _put_half_then_die
    """
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A config saving every 2 of 6 iterations (1 kept), and its uninterrupted run."""
    root = tmp_path_factory.mktemp("resume")
    workspace = tiny_runs.make_workspace(root, num_train=8)
    (root / "hooks").mkdir()
    (root / "hooks" / "crash_hooks.py").write_text(CRASH_HOOKS)
    config = tiny_runs.write_config(
        root / "tiny.py",
        workspace,
        options={
            "train_cfg.max_iters": ITERS,
            "default_hooks.checkpoint.interval": INTERVAL,
            "default_hooks.checkpoint.max_keep_ckpts": 1,
            "default_hooks.checkpoint.type": "AtomicCheckpointHook",
        },
        additions={
            "custom_imports": dict(imports=["groma_px.engine", "crash_hooks"]),
            "custom_hooks": [dict(type="SigkillAtIterHook")],
        },
    )
    reference = root / "reference"
    _train(root, config, reference)
    # the same model without the crash hooks, for in-process tools
    plain = tiny_runs.write_config(root / "plain.py", workspace)
    return {"root": root, "config": config, "plain": plain, "reference": reference}


@pytest.fixture(scope="module")
def random_setup(setup: dict) -> dict:
    """The same, keeping everything that draws random numbers in training (random visual
    prompts in the pipeline, shuffled regions, dropped region-text words, mask subsets), and
    its uninterrupted run."""
    root = setup["root"]
    config = tiny_runs.write_config(
        root / "tiny_random.py",
        tiny_runs.TinyWorkspace(root / "data", root / "tokenizer"),
        options={
            "train_cfg.max_iters": ITERS,
            "default_hooks.checkpoint.interval": INTERVAL,
            "default_hooks.checkpoint.max_keep_ckpts": 1,
            "default_hooks.checkpoint.type": "AtomicCheckpointHook",
            "model.mask_loss.max_masks": 1,
        },
        additions={
            "custom_imports": dict(imports=["groma_px.engine", "crash_hooks"]),
            "custom_hooks": [dict(type="SigkillAtIterHook")],
        },
        deterministic=False,
    )
    reference = root / "random_reference"
    _train(root, config, reference)
    return {"root": root, "config": config, "reference": reference}


def _train(root: Path, config: Path, work_dir: Path, *args: str, check: bool = True, **env) -> int:
    """Runs tools/train.py with the crash hooks importable; ``env`` arms them."""
    proc = tiny_runs.run_tool(
        "train",
        [str(config), "--work-dir", str(work_dir), *args],
        extra_pythonpath=[root / "hooks"],
        extra_env=env,
        check=check,
    )
    return proc.returncode


def _assert_same_run(work_dir: Path, reference: Path) -> None:
    final = tiny_runs.load_weights(work_dir / f"iter_{ITERS}.pth")
    expected = tiny_runs.load_weights(reference / f"iter_{ITERS}.pth")
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in final)
    losses = tiny_runs.train_losses(work_dir)
    assert sorted(losses) == list(range(1, ITERS + 1))
    assert losses == tiny_runs.train_losses(reference)


def _pointer(work_dir: Path) -> Path:
    return Path((work_dir / "last_checkpoint").read_text().strip())


@pytest.mark.slow
def test_resume_after_a_kill_mid_run_reproduces_the_uninterrupted_run(setup):
    work = setup["root"] / "killed_mid_run"
    returncode = _train(setup["root"], setup["config"], work, check=False, SIGKILL_AT_ITER="5")
    assert returncode != 0
    assert _pointer(work) == work / "iter_4.pth"  # iteration 5 is lost and redone
    _train(setup["root"], setup["config"], work, "--resume")
    _assert_same_run(work, setup["reference"])


@pytest.mark.slow
def test_a_random_run_resumed_after_a_kill_continues_the_same_random_stream(random_setup):
    root, config = random_setup["root"], random_setup["config"]
    work = root / "random_killed"
    assert _train(root, config, work, check=False, SIGKILL_AT_ITER="3") != 0
    assert _pointer(work) == work / "iter_2.pth"
    _train(root, config, work, "--resume")
    _assert_same_run(work, random_setup["reference"])


@pytest.mark.slow
def test_without_the_rng_states_a_resumed_random_run_diverges(random_setup):
    # Why the states: the same kill and resume with mmengine's hook (fresh seeds on resume).
    root, config = random_setup["root"], random_setup["config"]
    work = root / "random_stock"
    stock = ("--cfg-options", "default_hooks.checkpoint.type=CheckpointHook")
    assert _train(root, config, work, *stock, check=False, SIGKILL_AT_ITER="3") != 0
    _train(root, config, work, *stock, "--resume")
    losses = tiny_runs.train_losses(work)
    expected = tiny_runs.train_losses(random_setup["reference"])
    assert sorted(losses) == list(range(1, ITERS + 1))
    assert [losses[i] for i in (1, 2)] == [expected[i] for i in (1, 2)]  # before the kill
    assert [losses[i] for i in range(3, ITERS + 1)] != [expected[i] for i in range(3, ITERS + 1)]


@pytest.mark.slow
def test_a_kill_while_saving_leaves_the_previous_checkpoint_usable(setup):
    work = setup["root"] / "killed_while_saving"
    code = _train(
        setup["root"], setup["config"], work, check=False, SIGKILL_WHILE_SAVING="iter_4.pth"
    )
    assert code != 0
    # the half-written checkpoint never took the final name; the pointer and iter_2 survive
    assert (work / f".iter_4.pth{PARTIAL_SUFFIX}").is_file()
    assert not (work / "iter_4.pth").exists()
    assert _pointer(work) == work / "iter_2.pth"
    state = torch.load(work / "iter_2.pth", map_location="cpu", weights_only=False)
    assert state["meta"]["iter"] == 2
    _train(setup["root"], setup["config"], work, "--resume")
    _assert_same_run(work, setup["reference"])


@pytest.mark.slow
def test_mmengine_checkpoint_hook_loses_the_previous_checkpoint_in_the_same_kill(setup):
    # Why AtomicCheckpointHook: mmengine's hook removes iter_2 before writing iter_4 in place.
    work = setup["root"] / "stock_hook"
    code = _train(
        setup["root"],
        setup["config"],
        work,
        "--cfg-options",
        "default_hooks.checkpoint.type=CheckpointHook",
        check=False,
        SIGKILL_WHILE_SAVING="iter_4.pth",
    )
    assert code != 0
    assert not (work / "iter_2.pth").exists()
    with pytest.raises(RuntimeError):  # truncated zip archive
        torch.load(work / "iter_4.pth", map_location="cpu", weights_only=False)
    assert not _pointer(work).exists()


@pytest.mark.slow
def test_evaluating_a_checkpoint_of_another_config_names_missing_and_unexpected_keys(setup):
    checkpoint = torch.load(
        setup["reference"] / f"iter_{ITERS}.pth", map_location="cpu", weights_only=False
    )
    dropped = "llm.new_head.weight"
    del checkpoint["state_dict"][dropped]
    checkpoint["state_dict"]["mask_head.extra.weight"] = torch.zeros(2)
    mismatched = setup["root"] / "mismatched.pth"
    torch.save(checkpoint, mismatched)
    main = _tool_main("test")
    args = [str(setup["plain"]), str(mismatched), "--work-dir", str(setup["root"] / "eval")]
    with pytest.raises(KeyError) as info:
        main(args)
    message = str(info.value)
    assert f"missing keys ['{dropped}'] (1)" in message
    assert "unexpected keys ['mask_head.extra.weight'] (1)" in message


def _tool_main(name: str):
    spec = importlib.util.spec_from_file_location(
        f"tools_{name}", tiny_runs.REPO_ROOT / "tools" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.slow
def test_the_final_checkpoint_exports_to_a_directory_that_grounded_chat_loads(setup):
    from groma_px.inference import GroundedChat

    checkpoint = setup["reference"] / f"iter_{ITERS}.pth"
    out = _tool_main("export")([str(setup["plain"]), str(checkpoint), str(setup["root"] / "model")])
    assert {p.name for p in out.iterdir()} == {"config.py", "model.safetensors", "tokenizer"}
    chat = GroundedChat.from_pretrained(out)
    loaded = chat.model.state_dict()
    trained = tiny_runs.load_weights(checkpoint)
    assert loaded.keys() == trained.keys()
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)
