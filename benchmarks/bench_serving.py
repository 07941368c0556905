"""Serving: latency of the Ray Serve app against a bare in-process generate and Ray Serve's own
floor, throughput at concurrency 16, a cold deploy and a rolling swap, in one run on 127.0.0.1.

The path up to approved_model is materialized with small settings (100 fine-tune steps, 20 eval
examples, min token F1 0.3) in a temporary LLMOPS_HOME, and the production version is deployed
with its own ports (HTTP 8093, GCS 6473: not the test suite's).

Latency: sequential POST /v1/generate over HTTP (one kept-alive connection, same prompt,
max_new_tokens 16), client wall time, against the bare path in this process: the same merged model
folder loaded with transformers, the same Jinja template rendered and tokenized as the replica does,
greedy `generate` with the same max_new_tokens, one torch thread. Ours includes what serving adds:
HTTP proxy, FastAPI validation, rate limits, the batch queue and the request_log commit.

Ray Serve's floor, in the same run: a no-op deployment behind the same proxy (app "floor" at
/floor), which answers the same JSON shape and size from FastAPI without a model, a batch queue or
a database, asked by the same client. All three are timed interleaved in blocks, so machine noise
hits them alike. Goal: our p50 minus the bare generate's p50 at most 2 ms above the floor's p50
(what our app adds over Serve's own cost).

Throughput: 16 client threads (one kept-alive connection each) send a fixed number of requests
(max_new_tokens 16); requests/s over the wall time, for the floor, for ours batched
(max_batch_size as configured) and, after a rolling swap, for ours with max_batch_size 1. The CPU
time each process spent a request (proxy, replica, database, this client) is printed beside it:
on 2 cores the floor's path alone keeps both busy, so its throughput bounds ours. Goals: with the
default model, batched throughput at least 0.8 of the floor's; with `--model large` (8 layers,
width 512, where generation dominates a request), batched at least 2x unbatched.

Streaming: sequential streamed POST /v1/chat/completions (greedy, max_tokens 16, one connection
each), client side: time to first token (the first text event after the request was sent) and
time between tokens (between consecutive text events), p50 and p99; then STREAMS_AT_ONCE streams at
once, time to first token p50 and p99 (they share batches, so the first token waits for a batch's
turn). Measured last, on the max_batch_size 1 deployment the swap left.

Deploy and swap: serving_deployment's first deploy on a fresh head; then, with the floor app
deleted (its replica would hold the CPU the new replica needs), a rolling swap to a new config
under steady traffic, with failed requests counted. Goals: at most 20 s and 10 s, none failed.

    python benchmarks/bench_serving.py [--latency-requests 200] [--throughput-requests 400]
                                       [--model default|large]
"""

import argparse
import dataclasses
import http.client
import itertools
import json
import math
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from results import record

HTTP_PORT = 8093
GCS_PORT = 6473
PROMPT = "Where is my order A12345?"
MAX_NEW_TOKENS = 16
WARMUP = 10
BLOCKS = 4
CONCURRENCY = 16
# Under the proxy's default cap of 16 requests in flight per address: a stream's slot is freed
# only once the proxy has seen its end, a moment after the client has.
STREAMS_AT_ONCE = 12
REFUSED_STREAMS: list[int] = []  # one entry per 429 a stream got before it was answered


# --model large: a base model where generation dominates a request (8 layers, width 512), trained
# only enough to answer (its quality is not the point here).
LARGE = {
    "base_model": {"config": {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 8,
                              "num_attention_heads": 8}},
    "finetuned_checkpoint": {"config": {"max_steps": 20, "checkpoint_every": 20}},
    "approved_model": {"config": {"min_token_f1": 0.0, "max_loss": 1000.0}},
}


def materialize_approved(home: Path, large: bool = False) -> tuple[dict, object]:
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
                **(LARGE if large else {}),
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
        # Every request comes from 127.0.0.1: limits far above the load keep the limiter's and the
        # proxy's admission cost in the measured path without refusing anything (16 clients at once
        # briefly hold more than the default 16 in flight per host while connections close).
        generate_rate_limit="1000000/minute", max_concurrent_per_address=4096))


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
        time.sleep(0.1)
    raise RuntimeError(f"the serving app did not settle on {replicas} running replica(s)")


def deploy_floor(answer: dict) -> None:
    """Ray Serve's floor: a FastAPI deployment that returns `answer` (our answer's JSON, same
    size) to POST /floor/v1/generate, with no model, batch queue or database behind it."""
    from fastapi import FastAPI
    from ray import serve

    floor_api = FastAPI()

    @serve.deployment(max_ongoing_requests=64)
    @serve.ingress(floor_api)
    class Floor:
        @floor_api.post("/v1/generate")
        def generate(self, body: dict) -> dict:
            return answer

    serve.run(Floor.bind(), name="floor", route_prefix="/floor", blocking=False)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        app = serve.status().applications.get("floor")
        if app is not None and app.status == "RUNNING":
            return
        time.sleep(0.5)
    raise RuntimeError("the floor app did not start")


class Client:
    """A kept-alive HTTP connection per thread to the served app (`prefix`: the app's route)."""

    def __init__(self, port: int, prefix: str = ""):
        self.port, self.prefix = port, prefix
        self.local = threading.local()
        self.body = json.dumps({"prompt": PROMPT, "max_new_tokens": MAX_NEW_TOKENS}).encode()
        self.server_ms: list[float] = []  # the replica's own latency_ms (batch queue + generate)

    def generate(self) -> str:
        connection = getattr(self.local, "connection", None)
        if connection is None:
            connection = self.local.connection = http.client.HTTPConnection("127.0.0.1", self.port,
                                                                             timeout=60)
        connection.request("POST", f"{self.prefix}/v1/generate", body=self.body,
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"POST /v1/generate answered {response.status}: {payload[:300]!r}")
        answer = self.last_answer = json.loads(payload)
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
            config.prompt_renderer["text"])

    def generate(self, batch: int = 1) -> str:
        """The answer to PROMPT, generated `batch` times over in one call (one row a copy)."""
        import torch

        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        ids = (bos + self.tokenizer(self.template.render(prompt=PROMPT), add_special_tokens=False)
               ["input_ids"])[-(self.config.seq_len - 1):]
        input_ids = torch.tensor([ids] * batch)
        with torch.inference_mode():
            output = self.model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False, eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.decode(output[0][len(ids):], skip_special_tokens=True).strip()


class SteadyTraffic:
    """Requests one after another from a thread of its own while a block runs; counts failures."""

    def __init__(self, port: int):
        self.client = Client(port)
        self.sent = self.failed = 0
        self.longest_s = 0.0  # the slowest request: a swap that leaves no replica shows here
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._send, daemon=True)

    def _send(self) -> None:
        while not self.stop.is_set():
            self.sent += 1
            started = time.perf_counter()
            try:
                self.client.generate()
            except Exception:  # noqa: BLE001 - any failure counts, whatever raised it
                self.failed += 1
                self.client.local.connection = None
            self.longest_s = max(self.longest_s, time.perf_counter() - started)

    def __enter__(self) -> "SteadyTraffic":
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


def streamed_times(port: int) -> tuple[float, list[float]]:
    """One streamed greedy chat completion: seconds to its first text event, and between text
    events (a text event can hold more than one token when a token's text waits for the next)."""
    body = json.dumps({"model": "default", "messages": [{"role": "user", "content": PROMPT}],
                       "max_tokens": MAX_NEW_TOKENS, "stream": True}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        while True:  # a 429 (the proxy's in-flight cap per address) is retried, and not timed
            started = time.perf_counter()
            connection.request("POST", "/v1/chat/completions", body=body,
                               headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            if response.status != 429:
                break
            response.read()
            REFUSED_STREAMS.append(1)
            connection.close()
            time.sleep(float(response.headers.get("Retry-After", "1")))
        if response.status != 200:
            raise RuntimeError(f"a stream answered {response.status}: {response.read()[:300]!r}")
        arrivals = []
        for line in response:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            choices = json.loads(line[len(b"data: "):])["choices"]
            if choices and choices[0]["delta"].get("content"):
                arrivals.append(time.perf_counter())
    finally:
        connection.close()
    if not arrivals:
        return math.nan, []
    return arrivals[0] - started, [b - a for a, b in itertools.pairwise(arrivals)]


def timed(call, n: int) -> list[float]:
    """Wall seconds of n sequential calls."""
    times = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return times


def process_cpu_s() -> dict[str, float]:
    """CPU seconds (user + system) so far of the processes a request passes through, by role:
    Serve's proxy, each app's replica, PostgreSQL, and this process (the HTTP client)."""
    import psutil

    roles = {"ProxyActor": "proxy", "ServeReplica:floor": "floor replica",
             "ServeReplica:llmops": "our replica", "postgres": "database"}
    totals: dict[str, float] = {}
    for process in psutil.process_iter(["cmdline", "pid"]):
        try:
            command = " ".join(process.info["cmdline"] or [])
            role = ("client" if process.info["pid"] == os.getpid() else
                    next((name for marker, name in roles.items() if marker in command), None))
            if role is not None:
                times = process.cpu_times()
                totals[role] = totals.get(role, 0.0) + times.user + times.system
        except psutil.Error:  # a process that ended meanwhile
            continue
    return totals


def throughput(client: Client, requests: int) -> tuple[float, dict[str, float]]:
    """Requests/s of `requests` POSTs from CONCURRENCY threads, after one warm-up round each, and
    the CPU milliseconds each process role spent a request meanwhile."""
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(lambda _: client.generate(), range(2 * CONCURRENCY)))
        before, started = process_cpu_s(), time.perf_counter()
        list(pool.map(lambda _: client.generate(), range(requests)))
        rate = requests / (time.perf_counter() - started)
    after = process_cpu_s()
    return rate, {role: (after[role] - before.get(role, 0.0)) * 1000 / requests for role in after
                  if after[role] - before.get(role, 0.0) > 0.00005 * requests}  # over 0.05 ms


def cpu_line(cpu_ms: dict[str, float]) -> str:
    return ", ".join(f"{role} {ms:.1f}" for role, ms in sorted(cpu_ms.items())) + \
        f" (all {sum(cpu_ms.values()):.1f})"


def percentile_ms(times: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(times, q)) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-requests", type=int, default=200)
    parser.add_argument("--throughput-requests", type=int, default=400)
    parser.add_argument("--model", choices=["default", "large"], default="default",
                        help="large: 8 layers, width 512, where generation dominates a request")
    args = parser.parse_args()
    bench = "serving" if args.model == "default" else "serving, 8 layers x 512"
    home = Path(tempfile.mkdtemp(prefix="llmops-bsv-", dir="/tmp"))
    os.environ["LLMOPS_HOME"] = str(home)
    os.environ.pop("LLMOPS_DATABASE_URL", None)
    ray_serve = None
    started = time.perf_counter()
    try:
        resources, config = materialize_approved(home, large=args.model == "large")
        pipeline_s = time.perf_counter() - started
        ray_serve = resources["ray_serve"]
        from ray import serve

        deploy_started = time.perf_counter()
        ray_serve.deploy(config)
        wait_rolled_out(ray_serve.replicas)
        deploy_s = time.perf_counter() - deploy_started

        client, bare = Client(HTTP_PORT), BareModel(config)
        same_text = client.generate() == bare.generate()
        deploy_floor(client.last_answer)
        floor_client = Client(HTTP_PORT, prefix="/floor")
        for call in (client.generate, bare.generate, floor_client.generate):
            timed(call, WARMUP)
        served, local, floor = [], [], []
        client.server_ms.clear()
        per_block = -(-args.latency_requests // BLOCKS)
        for block in range(BLOCKS):  # interleaved, so machine noise hits all three alike
            n = min(per_block, args.latency_requests - block * per_block)
            served += timed(client.generate, n)
            local += timed(bare.generate, n)
            floor += timed(floor_client.generate, n)

        in_replica = list(client.server_ms)
        # The model's own CPU a request when batched: a bare generate of a full batch, per row.
        batch_ms = percentile_ms(timed(lambda: bare.generate(config.max_batch_size), 20), 50)
        floor_throughput, floor_cpu = throughput(floor_client, args.throughput_requests)
        batched, batched_cpu = throughput(client, args.throughput_requests)
        # The swap's new replica needs the CPU the floor's replica holds on this 2-CPU head.
        serve.delete("floor")
        # A rolling swap (new config: new replicas replace the old) under steady traffic.
        unbatched_config = dataclasses.replace(config, max_batch_size=1)
        with SteadyTraffic(HTTP_PORT) as traffic:
            swap_started = time.perf_counter()
            ray_serve.deploy(unbatched_config)
            wait_rolled_out(ray_serve.replicas)
            swap_s = time.perf_counter() - swap_started
        unbatched, unbatched_cpu = throughput(client, args.throughput_requests)
        first_token, between_tokens = [], []
        for _ in range(WARMUP + max(args.latency_requests // 4, 1)):
            first, gaps = streamed_times(HTTP_PORT)
            first_token.append(first)
            between_tokens += gaps
        first_token = first_token[WARMUP:]
        with ThreadPoolExecutor(STREAMS_AT_ONCE) as pool:
            concurrent_first = [first for first, _ in pool.map(
                lambda _: streamed_times(HTTP_PORT), range(STREAMS_AT_ONCE * 4))]
    finally:
        from llmops_dagster.infra import database

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
    floor_p50 = percentile_ms(floor, 50)
    print(f"  Ray Serve floor (no-op, same proxy)   {floor_p50:7.1f}   {percentile_ms(floor, 99):7.1f}")
    added = served_p50 - bare_p50 - floor_p50
    print(f"  ours - bare - floor at p50: {added:+.1f} ms (goal: at most 2 ms); "
          f"ours/bare {served_p50 / bare_p50:.2f}x")
    ttft_p50 = percentile_ms(first_token, 50)
    print(f"streaming (chat completions, stream: true), {len(first_token)} sequential streams")
    print(f"  time to first token   p50 {ttft_p50:6.1f} ms   p99 {percentile_ms(first_token, 99):6.1f} ms")
    if between_tokens:
        print(f"  time between tokens   p50 {percentile_ms(between_tokens, 50):6.1f} ms   "
              f"p99 {percentile_ms(between_tokens, 99):6.1f} ms")
    print(f"  {STREAMS_AT_ONCE} at once: time to first token "
          f"p50 {percentile_ms(concurrent_first, 50):.1f} ms, "
          f"p99 {percentile_ms(concurrent_first, 99):.1f} ms ({len(REFUSED_STREAMS)} 429s retried)")
    print(f"throughput, {CONCURRENCY} concurrent clients, {args.throughput_requests} requests; "
          "CPU ms a request by process")
    print(f"  max_batch_size {config.max_batch_size}   {batched:7.1f} requests/s   {cpu_line(batched_cpu)}")
    print(f"  max_batch_size 1   {unbatched:7.1f} requests/s   {cpu_line(unbatched_cpu)}")
    print(f"  Ray Serve floor    {floor_throughput:7.1f} requests/s   {cpu_line(floor_cpu)}")
    to_floor, to_unbatched = batched / floor_throughput, batched / unbatched
    model_ms = batch_ms / config.max_batch_size
    floor_all = sum(floor_cpu.values())
    ceiling = floor_all / (floor_all + model_ms)
    print(f"  the model alone, a bare batch of {config.max_batch_size}: {batch_ms:.1f} ms, "
          f"{model_ms:.2f} ms a request; with the floor's {floor_all:.1f} ms of CPU a request, "
          f"a CPU-bound machine reaches at most {ceiling:.2f} of the floor's throughput")
    print(f"  ratio batched/floor: {to_floor:.2f}"
          + (" (goal: at least 0.8)" if args.model == "default" else " (no goal: generation dominates)"))
    print(f"  ratio batched/unbatched: {to_unbatched:.2f}x"
          + (" (goal: at least 2x)" if args.model == "large" else ""))
    record(bench, "p50 added over Ray Serve's floor (ours - bare generate - no-op floor)", added, "ms",
           "at most 2 ms", added <= 2)
    record(bench, "p50 of Ray Serve's no-op floor", floor_p50, "ms", "", None)
    record(bench, "p50 time to first token, streamed, sequential", ttft_p50, "ms", "", None)
    if between_tokens:
        record(bench, "p50 time between tokens, streamed", percentile_ms(between_tokens, 50), "ms", "", None)
    record(bench, f"p50 time to first token, {STREAMS_AT_ONCE} streams at once",
           percentile_ms(concurrent_first, 50), "ms", "", None)
    record(bench, "p50 of the bare generate (the model's own cost a request)", bare_p50, "ms", "", None)
    if args.model == "default":
        record(bench, "batched throughput / floor's, 16 clients", to_floor, "x", "at least 0.8",
               to_floor >= 0.8)
        record(bench, "ceiling of that ratio: floor's CPU a request / (floor's + bare batched "
               "generate's)", ceiling, "x", "", None)
        record(bench, "CPU a request: floor's path / ours (all processes)",
               floor_all / sum(batched_cpu.values()), "x", "", None)
        record(bench, "batched / unbatched throughput, 16 clients", to_unbatched, "x", "", None)
    else:
        record(bench, "batched throughput / floor's, 16 clients", to_floor, "x", "", None)
        record(bench, "batched / unbatched throughput, 16 clients", to_unbatched, "x", "at least 2x",
               to_unbatched >= 2)
    print(f"deploy on a fresh head {deploy_s:.1f} s (goal: at most 20 s); rolling swap {swap_s:.1f} s "
          f"(goal: at most 10 s), {traffic.failed} of {traffic.sent} requests failed during it, "
          f"the slowest took {traffic.longest_s * 1000:.0f} ms")
    record(bench, "serving_deployment on a fresh head (Ray head, Serve, replica)", deploy_s, "s",
           "at most 20 s", deploy_s <= 20)
    record(bench, "rolling swap to a new config under traffic", swap_s, "s", "at most 10 s",
           swap_s <= 10)
    record(bench, "requests failed during the swap", traffic.failed, "", "0", traffic.failed == 0)
    record(bench, "slowest request during the swap", traffic.longest_s * 1000, "ms", "", None)
    print(f"whole run {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
