"""The scheduler without a model: token budgets, chunked prefill, preemption, and requests waiting
for KV from the store, driven through `schedule()` / `update_from_output()` with a fake connector."""

from __future__ import annotations

from engine.core.kv_cache_manager import KVCacheManager
from engine.core.request import EngineRequest, Request, RequestStatus
from engine.core.scheduler import Scheduler
from engine.sampling.params import SamplingParams

PAGE = 16
EOS = 1


class FakeConnector:
    """Answers lookups from a table (request id -> tokens the store holds) and finishes loads when told."""

    def __init__(self, held: dict[str, int]) -> None:
        self.held = held
        self.loads: dict[str, tuple[int, int]] = {}    # request id -> (first token, tokens)
        self.done: list[tuple[str, int]] = []
        self.prefills: list[tuple[str, int]] = []
        self.first_tokens: list[str] = []
        self.finished: list[str] = []

    def num_tokens_to_load(self, request: Request, gpu_hit_tokens: int) -> int:
        return max(0, self.held.get(request.request_id, 0) - gpu_hit_tokens)

    def start_load(self, request: Request, page_ids: list[int], gpu_hit_tokens: int, num_tokens: int) -> None:
        assert len(page_ids) * PAGE >= gpu_hit_tokens + num_tokens   # pages for everything it loads
        self.loads[request.request_id] = (gpu_hit_tokens, num_tokens)

    def finish(self, request_id: str, tokens_ready: int) -> None:
        self.done.append((request_id, tokens_ready))

    def finished_loads(self) -> list[tuple[str, int]]:
        done, self.done = self.done, []
        return done

    def record_prefill(self, request: Request, num_computed_tokens: int) -> None:
        self.prefills.append((request.request_id, num_computed_tokens))

    def first_token(self, request: Request) -> None:
        self.first_tokens.append(request.request_id)

    def request_finished(self, request_id: str) -> None:
        self.finished.append(request_id)


def create_scheduler(num_blocks: int = 64, budget: int = 256, max_seqs: int = 8,
                     connector: FakeConnector | None = None, long_prefill_token_threshold: int = 0) -> Scheduler:
    return Scheduler(KVCacheManager(num_blocks, PAGE), max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                     max_model_len=2048, eos_token_ids=[EOS], connector=connector,
                     long_prefill_token_threshold=long_prefill_token_threshold)


def create_request(request_id: str, num_tokens: int, max_tokens: int = 4) -> Request:
    """A prompt of its own (no prefix shared with another request's: no prefix-cache hits)."""
    salt = sum(map(ord, request_id))
    prompt = [2 + (salt * 7919 + i * 104729) % 250 for i in range(num_tokens)]
    req = EngineRequest(request_id, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    return Request(req, seed=0, max_tokens=max_tokens, block_size=PAGE, hash_seed=b"test-namespace")


def plan(scheduler: Scheduler) -> list[tuple[str, int, int]]:
    """Schedule one step and feed back token 5 for every row that samples; (id, start, tokens) each."""
    out = scheduler.schedule()
    scheduler.update_from_output(out, [5] * sum(sr.sample for sr in out.scheduled))
    return [(sr.request.request_id, sr.start, sr.num_tokens) for sr in out.scheduled]


def test_prefills_are_chunked_under_the_token_budget():
    scheduler = create_scheduler(budget=256)
    for rid in ("a", "b"):
        scheduler.add_request(create_request(rid, 300))
    assert plan(scheduler) == [("a", 0, 256)]
    assert plan(scheduler) == [("a", 256, 44), ("b", 0, 212)]
    assert plan(scheduler) == [("a", 300, 1), ("b", 212, 88)]
    assert plan(scheduler) == [("a", 301, 1), ("b", 300, 1)]


def test_a_long_prompt_beside_running_decodes_is_split_into_steps_of_at_most_the_threshold():
    scheduler = create_scheduler(budget=256, long_prefill_token_threshold=64)
    scheduler.add_request(create_request("short", 40, max_tokens=8))
    assert plan(scheduler) == [("short", 0, 40)]       # under the threshold: one step, as without it
    scheduler.add_request(create_request("long", 150))
    # Admitted with 64 tokens, continued 64 at a time while running; "short" decodes every step.
    assert plan(scheduler) == [("short", 40, 1), ("long", 0, 64)]
    assert plan(scheduler) == [("short", 41, 1), ("long", 64, 64)]
    assert plan(scheduler) == [("short", 42, 1), ("long", 128, 22)]
    assert plan(scheduler) == [("short", 43, 1), ("long", 150, 1)]


def test_the_threshold_caps_each_prefill_and_the_budget_still_caps_the_step():
    scheduler = create_scheduler(budget=100, long_prefill_token_threshold=64)
    for rid in ("a", "b"):
        scheduler.add_request(create_request(rid, 150))
    assert plan(scheduler) == [("a", 0, 64), ("b", 0, 36)]
    assert plan(scheduler) == [("a", 64, 64), ("b", 36, 36)]
    assert plan(scheduler) == [("a", 128, 22), ("b", 72, 64)]
    assert plan(scheduler) == [("a", 150, 1), ("b", 136, 14)]


def test_a_prefill_resuming_after_its_kv_load_is_capped_by_the_threshold():
    connector = FakeConnector({"hit": 512})
    scheduler = create_scheduler(budget=1024, connector=connector, long_prefill_token_threshold=64)
    scheduler.add_request(create_request("hit", 600))
    assert plan(scheduler) == []
    connector.finish("hit", 512)
    assert plan(scheduler) == [("hit", 512, 64)]
    assert plan(scheduler) == [("hit", 576, 24)]
    assert connector.prefills == [("hit", 512)]


def test_the_most_recent_request_is_preempted_when_blocks_run_out_and_resumes_from_scratch():
    scheduler = create_scheduler(num_blocks=10, budget=512)   # 160 tokens of KV
    scheduler.add_request(create_request("old", 64, max_tokens=40))
    scheduler.add_request(create_request("new", 80, max_tokens=40))
    assert plan(scheduler) == [("old", 0, 64), ("new", 0, 80)]    # 4 + 5 of the 10 blocks
    # Token 65 of "old" takes the last free block; token 81 of "new" finds none: "new", the most
    # recently admitted, gives its blocks back and waits at the front of the queue.
    assert plan(scheduler) == [("old", 64, 1)]
    assert scheduler.num_preemptions == 1
    preempted = scheduler.requests["new"]
    assert preempted.status == RequestStatus.WAITING and preempted.num_computed_tokens == 0
    assert preempted.output_token_ids == [5]     # its output so far is kept
    assert scheduler.waiting[0] is preempted


def test_a_request_whose_prefix_the_store_holds_waits_for_its_kv_without_taking_budget():
    connector = FakeConnector({"hit": 512})
    scheduler = create_scheduler(budget=256, connector=connector)
    scheduler.add_request(create_request("hit", 600))
    scheduler.add_request(create_request("other", 100))
    # "hit" gets its pages and waits; "other" runs in the same step with the whole budget.
    assert plan(scheduler) == [("other", 0, 100)]
    assert connector.loads == {"hit": (0, 512)}
    assert scheduler.requests["hit"].status == RequestStatus.WAITING_FOR_KV
    assert plan(scheduler) == [("other", 100, 1)]
    connector.finish("hit", 512)
    # Loaded: it joins the running requests and computes only the 88 tokens after what was loaded.
    assert plan(scheduler) == [("other", 101, 1), ("hit", 512, 88)]
    assert connector.prefills == [("other", 0), ("hit", 512)]
    assert "hit" in connector.first_tokens


def test_a_load_that_delivers_less_resumes_after_what_arrived():
    connector = FakeConnector({"hit": 512})
    scheduler = create_scheduler(budget=1024, connector=connector)
    scheduler.add_request(create_request("hit", 600))
    assert plan(scheduler) == []
    connector.finish("hit", 256)       # a block failed its checksum: the rest is recomputed
    assert plan(scheduler) == [("hit", 256, 344)]


def test_an_aborted_loading_request_frees_its_pages_and_tells_the_connector():
    connector = FakeConnector({"hit": 512})
    scheduler = create_scheduler(num_blocks=64, connector=connector)
    scheduler.add_request(create_request("hit", 600))
    plan(scheduler)
    used = scheduler.kv.usage
    scheduler.abort(["hit"])
    assert connector.finished == ["hit"] and scheduler.kv.usage < used
    assert not scheduler.has_unfinished_requests()
