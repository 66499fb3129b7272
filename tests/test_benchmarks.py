"""The benchmarks' plumbing: train_step.py (a measuring process that dies yields an error row instead of hanging the
table; ``--profile`` writes one operator table per run), host_syncs.py (op counts of one step) and placement.py
(methods in all / the last k encoder blocks beside Freeze Encoder)."""

from __future__ import annotations

import importlib.util
import io
import multiprocessing as mp
import os
import sys

import pytest
import torch

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def load_benchmark(name: str):
    sys.path.insert(0, BENCHMARKS)
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCHMARKS, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(BENCHMARKS)


def _dies(queue) -> None:
    os._exit(3)


def _answers(queue) -> None:
    queue.put({"method": "lora", "path": "optimized", "time_per_it": 1.0})


def test_a_dead_measuring_process_gives_an_error_row():
    train_step = load_benchmark("train_step")
    ctx = mp.get_context("spawn")
    rows = []
    for target in (_dies, _answers):
        queue = ctx.Queue()
        proc = ctx.Process(target=target, args=(queue,))
        proc.start()
        rows.append(train_step.result_of(proc, queue, "lora", "optimized"))
        proc.join()
    died, answered = rows
    assert died["method"] == "lora" and "exit code 3" in died["error"] and "time_per_it" not in died
    assert answered == {"method": "lora", "path": "optimized", "time_per_it": 1.0}


def test_profile_writes_one_operator_table(tmp_path):
    train_step = load_benchmark("train_step")
    weight = torch.randn(8, 8, requires_grad=True)

    def step():
        loss = (torch.randn(4, 8) @ weight).square().sum()
        loss.backward()
        return loss

    target = train_step.write_profile(str(tmp_path / "profiles"), "lora@last2", "optimized:autocast_dtype=none",
                                      torch.device("cpu"), step)
    assert os.path.basename(target) == "profile_lora-last2_optimized-autocast_dtype-none.txt"
    text = open(target).read()
    assert text.startswith("# lora@last2, optimized:autocast_dtype=none, cpu") and "aten::mm" in text


def test_host_syncs_counts_a_step_and_the_gpu_forms_dispatch_fewer_ops():
    host_syncs = load_benchmark("host_syncs")
    cpu = host_syncs.count_step("lora", "optimized", "tiny", 1, 4, 2, 0)
    gpu = host_syncs.count_step("lora", "optimized", "tiny", 1, 4, 2, 0, gpu_loops=True)
    assert 0 < gpu.ops < cpu.ops
    # the same prompts are drawn either way: the same host reads, from our prompt sampling among others
    assert cpu.reads == gpu.reads and cpu.reads["aten::nonzero"] > 0
    assert any(where.startswith("prompts.py:") for where in gpu.sources)


def test_placement_table_has_every_row_and_fewer_blocks_train_fewer_parameters():
    placement = load_benchmark("placement")
    args = placement.parser().parse_args(
        ["--model", "tiny", "--image-size", "64", "--methods", "lora,dora", "--ks", "all,1", "--steps", "1",
         "--warmup", "0", "--objects", "1", "--rounds", "1", "--threads", "1"]
    )
    out = io.StringIO()
    rows = placement.run(args, isolate=False, out=out)  # in this process: the real step, without spawn's import cost
    assert [(r["method"], r["k"]) for r in rows] == [
        ("freeze_encoder", None), ("lora", None), ("lora", 1), ("dora", None), ("dora", 1)]
    assert not any("error" in r for r in rows)
    floor, by = rows[0]["trainable"], {(r["method"], r["k"]): r["trainable"] for r in rows}
    for method in ("lora", "dora"):  # the tiny model has 2 blocks: the last one holds half the adapters
        assert by[(method, 1)] - floor == (by[(method, None)] - floor) // 2 > 0
    table = [line for line in out.getvalue().splitlines() if line.startswith("| ") and "---" not in line]
    assert table[0].startswith("| method | k (last blocks) | trainable params")
    assert [line.split(" | ")[:2] for line in table[1:]] == [
        ["| freeze_encoder", "—"], ["| lora", "all (2)"], ["| lora", "1"], ["| dora", "all (2)"], ["| dora", "1"]]
    assert table[1].endswith("| 1.00× | 1.00× |")  # the floor against itself
    assert all(float(line.split(" | ")[4]) > 0 for line in table[1:])  # s/step measured


def test_placement_rejects_bad_ks_and_methods_in_one_line():
    placement = load_benchmark("placement")
    with pytest.raises(ValueError, match=r"^--ks must be a comma-separated list of 'all' and positive ints, got '0'"):
        placement.parse_ks("all,0")
    with pytest.raises(ValueError, match=r"^--methods must name encoder methods of .*dora.*, got \['nope'\]$"):
        placement.row_specs(["lora", "nope"], [None])
    args = placement.parser().parse_args(["--model", "tiny", "--ks", "3"])
    with pytest.raises(ValueError, match=r"^--ks \[3\] exceed the 2 encoder blocks of model 'tiny'$"):
        placement.run(args, isolate=False, out=io.StringIO())
