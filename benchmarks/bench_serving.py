"""Serving: latency of the Ray Serve app against a bare in-process generate, and the throughput
that @serve.batch buys at concurrency 16, in one run on 127.0.0.1.

The path up to approved_model is materialized with small settings (100 fine-tune steps, 20 eval
examples, min token F1 0.3) in a temporary LLMOPS_HOME, and the production version is deployed
with its own ports (HTTP 8031, GCS 6411).

Latency: sequential POST /v1/generate over HTTP (one kept-alive connection, same prompt,
max_new_tokens 16), client wall time, against the bare path in this process: the same merged model
folder loaded with transformers, the same Jinja template rendered and tokenized as the replica does,
greedy `generate` with the same max_new_tokens, one torch thread. Both get the same warm-up and
number of calls, interleaved in blocks so machine noise hits both alike. Ours includes what serving
adds: HTTP proxy, FastAPI validation, the batch queue (its wait timeout) and the request_log INSERT.
Goal: p50 overhead at most 10%.

Throughput: 16 client threads (one kept-alive connection each) send a fixed number of requests
(max_new_tokens 16); requests/s over the wall time, with batching (max_batch_size 8) and once
redeployed with max_batch_size 1. Goal: batched/unbatched at least 2x.

    python benchmarks/bench_serving.py [--latency-requests 200] [--throughput-requests 400]
"""

import argparse
import dataclasses
import http.client
import json
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from results import record

HTTP_PORT = 8031
GCS_PORT = 6411
PROMPT = "Where is my order A12345?"
MAX_NEW_TOKENS = 16
WARMUP = 10
BLOCKS = 4
CONCURRENCY = 16


def materialize_approved(home: Path) -> tuple[dict, object]:
    """Materialize the path to approved_model; return the resources and the production ServingConfig."""
    import dagster as dg

    from assets.dataset import raw_examples, validated_dataset
    from assets.evaluation import eval_report
    from assets.governance import approved_model
    from assets.prompts import prompt_set
    from assets.serving import ServingDeploymentConfig, serving_config
    from assets.training import base_model, finetuned_checkpoint
    from llmops_dagster.definitions import defs
    from llmops_dagster.governance import registry
    from llmops_dagster.serving import credentials
    from resources.serving import RayServeResource

    resources = {**defs.resources,
                 "ray_serve": RayServeResource(http_port=HTTP_PORT, local_port=GCS_PORT)}
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [raw_examples, validated_dataset, prompt_set, base_model, finetuned_checkpoint,
             eval_report, approved_model],
            resources=resources, instance=instance,
            run_config={"ops": {
                "finetuned_checkpoint": {"config": {"max_steps": 100, "checkpoint_every": 100}},
                "eval_report": {"config": {"max_examples": 20}},
                "approved_model": {"config": {"min_token_f1": 0.3}},
            }},
        )
    if not result.success:
        raise RuntimeError("materializing the path to approved_model failed")
    database = resources["database"]
    engine = database.engine()
    version = registry.production(engine)
    if version is None:
        raise RuntimeError("approved_model left no version in production")
    credentials.signing_secret(engine)  # as serving_deployment does: the replicas' role only reads it
    return resources, serving_config(engine, version, database.serving_url(), ServingDeploymentConfig(
        # Every request comes from 127.0.0.1: a limit far above the load keeps the limiter's own
        # cost in the measured path without refusing anything.
        generate_rate_limit="1000000/minute"))


def wait_rolled_out(replicas: int, timeout_s: float = 180) -> None:
    """Until the app runs and only the new replicas are left (the old ones have stopped)."""
    from ray import serve

    from resources.serving import APP_NAME

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(APP_NAME)
        states = [{getattr(state, "value", state): n for state, n in d.replica_states.items()}
                  for d in app.deployments.values()] if app is not None else []
        if app is not None and app.status == "RUNNING" and all(
                state == {"RUNNING": replicas} for state in states):
            return
        time.sleep(0.5)
    raise RuntimeError(f"the serving app did not settle on {replicas} running replica(s)")


class Client:
    """A kept-alive HTTP connection per thread to the served app."""

    def __init__(self, port: int):
        self.port = port
        self.local = threading.local()
        self.body = json.dumps({"prompt": PROMPT, "max_new_tokens": MAX_NEW_TOKENS}).encode()
        self.server_ms: list[float] = []  # the replica's own latency_ms (batch queue + generate)

    def generate(self) -> str:
        connection = getattr(self.local, "connection", None)
        if connection is None:
            connection = self.local.connection = http.client.HTTPConnection("127.0.0.1", self.port,
                                                                             timeout=60)
        connection.request("POST", "/v1/generate", body=self.body,
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"POST /v1/generate answered {response.status}: {payload[:300]!r}")
        answer = json.loads(payload)
        self.server_ms.append(answer["latency_ms"])
        return answer["text"]


class BareModel:
    """The replica's generate path for one prompt, in this process, without serving."""

    def __init__(self, config):
        import jinja2
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(1)
        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(config.model_path)
        self.model = AutoModelForCausalLM.from_pretrained(config.model_path).eval()
        self.template = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(
            config.prompt_template)

    def generate(self) -> str:
        import torch

        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        ids = (bos + self.tokenizer(self.template.render(prompt=PROMPT), add_special_tokens=False)
               ["input_ids"])[-(self.config.seq_len - 1):]
        input_ids = torch.tensor([ids])
        with torch.inference_mode():
            output = self.model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False, eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.decode(output[0][len(ids):], skip_special_tokens=True).strip()


def timed(call, n: int) -> list[float]:
    """Wall seconds of n sequential calls."""
    times = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return times


def throughput(client: Client, requests: int) -> float:
    """Requests/s of `requests` POSTs from CONCURRENCY threads, after one warm-up round each."""
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(lambda _: client.generate(), range(2 * CONCURRENCY)))
        started = time.perf_counter()
        list(pool.map(lambda _: client.generate(), range(requests)))
        return requests / (time.perf_counter() - started)


def percentile_ms(times: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(times, q)) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-requests", type=int, default=200)
    parser.add_argument("--throughput-requests", type=int, default=400)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="llmops-bsv-", dir="/tmp"))
    os.environ["LLMOPS_HOME"] = str(home)
    os.environ.pop("LLMOPS_DATABASE_URL", None)
    ray_serve = None
    started = time.perf_counter()
    try:
        resources, config = materialize_approved(home)
        pipeline_s = time.perf_counter() - started
        ray_serve = resources["ray_serve"]
        deploy_started = time.perf_counter()
        ray_serve.deploy(config)
        wait_rolled_out(ray_serve.replicas)
        deploy_s = time.perf_counter() - deploy_started

        client, bare = Client(HTTP_PORT), BareModel(config)
        same_text = client.generate() == bare.generate()
        timed(client.generate, WARMUP)
        timed(bare.generate, WARMUP)
        served, local = [], []
        client.server_ms.clear()
        per_block = -(-args.latency_requests // BLOCKS)
        for block in range(BLOCKS):  # interleaved, so machine noise hits both alike
            n = min(per_block, args.latency_requests - block * per_block)
            served += timed(client.generate, n)
            local += timed(bare.generate, n)

        in_replica = list(client.server_ms)
        batched = throughput(client, args.throughput_requests)
        unbatched_config = dataclasses.replace(config, max_batch_size=1)
        ray_serve.deploy(unbatched_config)
        wait_rolled_out(ray_serve.replicas)
        unbatched = throughput(client, args.throughput_requests)
    finally:
        from llmops_dagster import database

        if ray_serve is not None:
            ray_serve.stop_local()
            shutil.rmtree(ray_serve.local_temp_dir(), ignore_errors=True)
        database.stop_embedded_server(home / "pg")
        shutil.rmtree(home, ignore_errors=True)

    import numpy as np

    served_p50, bare_p50 = percentile_ms(served, 50), percentile_ms(local, 50)
    print(f"serving, model {config.model_version} on 127.0.0.1:{HTTP_PORT}, max_new_tokens "
          f"{MAX_NEW_TOKENS} (pipeline to approved_model {pipeline_s:.0f} s, deploy {deploy_s:.0f} s)")
    print(f"latency, {len(served)} sequential requests each after {WARMUP} warm-up "
          f"(same greedy text: {'yes' if same_text else 'NO'})")
    print("                                        p50 ms    p99 ms")
    print(f"  ours (HTTP, Serve, batch queue, log)  {served_p50:7.1f}   {percentile_ms(served, 99):7.1f}")
    print(f"    of which in the replica's batch queue + generate (its latency_ms) "
          f"{float(np.median(in_replica)):.1f} ms p50")
    print(f"  bare transformers generate            {bare_p50:7.1f}   {percentile_ms(local, 99):7.1f}")
    print(f"  p50 overhead: {(served_p50 / bare_p50 - 1) * 100:+.1f}% (goal: at most +10%)")
    print(f"throughput, {CONCURRENCY} concurrent clients, {args.throughput_requests} requests")
    print(f"  max_batch_size {config.max_batch_size}   {batched:7.1f} requests/s")
    print(f"  max_batch_size 1   {unbatched:7.1f} requests/s")
    print(f"  ratio batched/unbatched: {batched / unbatched:.2f}x (goal: at least 2x)")
    record("serving", "p50 over bare generate (HTTP, Serve, batch queue, log)", served_p50 - bare_p50, "ms",
           "", None)
    record("serving", "batched / unbatched throughput, 16 clients", batched / unbatched, "x", "at least 2x",
           batched / unbatched >= 2)
    print(f"whole run {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
