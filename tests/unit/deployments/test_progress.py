"""The pure parts of deployments/progress.py: combining chunk reports, throttling, reading an event stream."""

from deployments.progress import ProgressStore, StepReporter, progress_view, read_events, sse


def record(n=4, steps=10, chunks=None, started=100.0, finished=None):
    return {"n": n, "steps": steps, "chunks": chunks or {}, "started_at": started, "finished_at": finished}


def test_chunks_in_parallel_add_up_to_image_steps_with_an_eta():
    view = progress_view("r", record(chunks={0: {"step": 5, "steps": 10, "images": 2},
                                             2: {"step": 10, "steps": 10, "images": 2}}), now=115.0)
    assert view["step"] == 30 and view["steps"] == 40 and view["fraction"] == 0.75
    assert view["images_done"] == 2
    assert view["eta_s"] == 5.0  # 15 s for three quarters: 5 s for the last quarter


def test_no_step_yet_has_no_eta_and_finished_has_zero():
    assert progress_view("r", record(), now=101.0)["eta_s"] is None
    done = progress_view("r", record(finished=104.0, chunks={0: {"step": 10, "steps": 10, "images": 4}}), 200.0)
    assert done["eta_s"] == 0.0 and done["finished"] and done["elapsed_s"] == 4.0


class FakeStore:
    def __init__(self):
        self.calls = []
        self.step = self

    def remote(self, *args):
        self.calls.append(args)


def test_reporter_sends_first_and_last_step_and_at_most_one_per_period_between():
    clock = iter([0.0, 0.05, 0.1, 0.3, 0.35, 0.4]).__next__
    store = FakeStore()
    report = StepReporter(store, "r", chunk=7, images=2, period_s=0.25, clock=clock)
    for step in range(1, 7):
        report(step, 6)
    assert [call[2] for call in store.calls] == [1, 4, 6]
    assert store.calls[0] == ("r", 7, 1, 6, 2)


def test_events_round_trip_through_the_reader():
    stream = (sse("progress", {"step": 1}) + sse("done", "[DONE]")).decode()
    assert list(read_events(stream.split("\n"))) == [("progress", {"step": 1}), ("done", "[DONE]")]


def test_store_keeps_a_request_finished_when_its_finish_arrives_before_its_start():
    store = ProgressStore()
    store.finish("late-start")
    store.start("late-start", n=2, steps=8)
    assert store.get("late-start")["finished"] is True
    assert store.current() is None
    store.start("running", n=1, steps=8)
    assert store.current()["request_id"] == "running"


def test_store_forgets_finished_requests_and_running_ones_that_lost_their_finish(monkeypatch):
    import deployments.progress as progress

    now = [1000.0]
    monkeypatch.setattr(progress.time, "time", lambda: now[0])
    store = ProgressStore()
    store.start("done", n=1, steps=4)
    store.finish("done")
    store.start("orphan", n=1, steps=4)
    now[0] += progress.KEEP_FINISHED_S + 1
    store.start("fresh", n=1, steps=4)
    assert store.get("done") is None and store.get("orphan") is not None
    now[0] += progress.FORGET_RUNNING_S
    store.start("fresher", n=1, steps=4)
    assert store.get("orphan") is None and store.get("fresher") is not None


def test_a_late_step_report_never_moves_the_bar_back_and_a_reused_id_starts_over():
    store = ProgressStore()
    store.start("r", n=1, steps=10)
    store.step("r", chunk=0, step=6, steps=10, images=1)
    store.step("r", chunk=0, step=4, steps=10, images=1)  # sent earlier, arrived later
    assert store.get("r")["step"] == 6
    store.finish("r")
    store.start("r", n=1, steps=10)  # A1111's force_task_id used again for a new job
    assert store.get("r")["finished"] is False and store.get("r")["step"] == 0
