"""The garbage collector policy of `orderlog serve` (gcpolicy.py), run in a child process:
gc state is process-wide, and pytest's own objects must not be frozen."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import cli_env


def run_child(script: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=cli_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_survivors_of_a_full_pass_are_frozen_and_closed_connections_hand_them_back():
    """After a full pass the live objects leave the collector's reach (later passes visit only
    newer ones); cyclic garbage among them is collected once RELEASE_AFTER connections closed."""
    out = run_child("""
        import gc, weakref
        from orderlog.service import gcpolicy

        class Node:
            pass

        def cycle():
            a, b = Node(), Node()
            a.other, b.other = b, a
            return a

        policy = gcpolicy.install(release_after=3, release_passes=4)
        live = [cycle() for _ in range(20_000)]  # long-lived, like a connection's objects
        gc.collect()
        assert gc.get_freeze_count() >= 40_000, gc.get_freeze_count()
        assert all(not gc.is_tracked(x) or not any(o is x for o in gc.get_objects(2)) for x in live[:3])

        probe = weakref.ref(live[0])
        del live  # now frozen cyclic garbage: the collector does not see it
        gc.collect()
        assert probe() is not None, "frozen garbage was collected without a hand-back"

        gcpolicy.connection_closed(); gcpolicy.connection_closed()
        gc.collect()
        assert probe() is not None and policy.releases == 0
        gcpolicy.connection_closed()  # the third: the frozen objects go back to the collector
        assert policy.releases == 1 and gc.get_freeze_count() == 0
        gc.collect()
        assert probe() is None, "the handed-back garbage was not collected"
        assert gc.get_freeze_count() > 0  # and what is still alive is frozen again

        # Whatever the connections do, the frozen objects go back after release_passes passes.
        keep = cycle()
        probe = weakref.ref(keep)
        gc.collect()  # the cycle is alive: frozen
        del keep  # frozen garbage now
        gc.collect()
        assert probe() is not None and policy.releases == 1
        passes = 0
        while policy.releases == 1:
            gc.collect()
            passes += 1
            assert passes <= policy.release_passes + 1, "no hand-back after release_passes passes"
        assert gc.get_freeze_count() == 0
        gc.collect()
        assert probe() is None, "frozen garbage outlived release_passes full passes"

        gcpolicy.uninstall()
        assert gc.get_freeze_count() == 0 and policy._on_gc not in gc.callbacks
        gcpolicy.connection_closed()  # not installed: nothing happens
        print("ok")
    """)
    assert out.strip() == "ok"


def test_survivors_of_a_middle_generation_pass_are_frozen_too():
    """A burst of new long-lived objects (a thousand connections) never waits for a full pass
    to leave the collector's reach: the middle generation's passes freeze their survivors."""
    out = run_child("""
        import gc
        from orderlog.service import gcpolicy

        gcpolicy.install()
        gc.disable()  # no automatic pass in between: only the ones below
        before = gc.get_freeze_count()
        live = [[i] for i in range(10_000)]  # young, tracked, alive
        gc.collect(0)
        assert gc.get_freeze_count() == before, "a young pass must not freeze"
        gc.collect(1)
        assert gc.get_freeze_count() >= before + 10_000, (before, gc.get_freeze_count())
        assert not gc.get_objects(1) or all(x is not live[0] for x in gc.get_objects(1))
        gcpolicy.uninstall()
        print("ok")
    """)
    assert out.strip() == "ok"
