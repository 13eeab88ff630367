import pytest

from deployments.auth import Authenticator, KeyFileError, is_open, load_keys

KEY_A = "a" * 20 + "-secret-one"
KEY_B = "b" * 20 + "-secret-two"


def key_file(tmp_path, text):
    path = tmp_path / "keys"
    path.write_text(text)
    return path


def test_key_file_names_keys_and_skips_comments(tmp_path):
    keys = load_keys(key_file(tmp_path, f"# team keys\nalice:{KEY_A}\n\n{KEY_B}\n"))
    assert keys["alice"] == KEY_A
    (unnamed,) = [name for name in keys if name != "alice"]
    assert unnamed.startswith("key-") and KEY_B not in unnamed  # a key is never its own name


@pytest.mark.parametrize("text, says", [("bob:short\n", "at least 16 characters"), ("# nothing\n", "has no keys")])
def test_bad_key_files_say_what_to_fix(tmp_path, text, says):
    with pytest.raises(KeyFileError, match=says):
        load_keys(key_file(tmp_path, text))


def test_missing_key_file_is_named(tmp_path):
    with pytest.raises(KeyFileError, match="cannot be read"):
        load_keys(tmp_path / "nope")


def test_bearer_keys_are_recognised_and_nothing_else():
    auth = Authenticator({"alice": KEY_A, "bob": KEY_B})
    assert auth.identify(f"Bearer {KEY_A}") == "alice"
    assert auth.identify(f"bearer {KEY_B}") == "bob"
    for header in (None, "", KEY_A, f"Basic {KEY_A}", f"Bearer {KEY_A[:-1]}", f"Bearer {KEY_A}x", "Bearer "):
        assert auth.identify(header) is None, header


def test_rate_limit_is_a_token_bucket_per_key():
    now = [0.0]
    auth = Authenticator({"alice": KEY_A, "bob": KEY_B}, rate_per_minute=3, clock=lambda: now[0])
    assert [auth.admit("alice") for _ in range(3)] == [None, None, None]
    wait = auth.admit("alice")
    assert wait == pytest.approx(20.0)  # one token every 60/3 s
    assert auth.admit("bob") is None  # other keys have their own bucket
    now[0] = 20.0
    assert auth.admit("alice") is None and auth.admit("alice") is not None


def test_a_replicas_share_of_a_small_rate_admits_one_then_waits_for_its_share():
    """Two ingress replicas share 1 request a minute: each holds 0.5 a minute, so a burst of one, then 120 s."""
    now = [0.0]
    auth = Authenticator({"alice": KEY_A}, rate_per_minute=1 / 2, clock=lambda: now[0])
    assert auth.admit("alice") is None
    assert auth.admit("alice") == pytest.approx(120.0)
    now[0] = 120.0
    assert auth.admit("alice") is None


def test_no_rate_limit_when_unset():
    auth = Authenticator({"alice": KEY_A})
    assert all(auth.admit("alice") is None for _ in range(1000))


@pytest.mark.parametrize("method, path, open_", [
    ("GET", "/healthz", True), ("GET", "/metrics", True), ("GET", "/", True), ("GET", "/static/app.js", True),
    ("POST", "/v1/images/generations", False), ("GET", "/v1/fleet", False), ("GET", "/v1/models", False),
    ("POST", "/healthz", False), ("GET", "/healthzz", False),
])
def test_only_health_metrics_and_the_page_are_open(method, path, open_):
    assert is_open(method, path) is open_


def test_a_changed_key_file_is_reread_and_a_broken_one_keeps_the_keys(tmp_path, caplog):
    """Kubernetes swaps a mounted Secret's file for a new one: within KEYS_RELOAD_S the new keys are in force and
    revoked ones refused; a file with no valid key leaves the keys as they were."""
    from deployments.auth import KEYS_RELOAD_S

    now = [0.0]
    path = key_file(tmp_path, f"alice:{KEY_A}\n")
    auth = Authenticator.from_file(path, clock=lambda: now[0])
    assert auth.identify(f"Bearer {KEY_A}") == "alice" and auth.identify(f"Bearer {KEY_B}") is None

    def replace(text):  # a new file moved over the old one, as the kubelet does
        new = tmp_path / "keys.new"
        new.write_text(text)
        new.replace(path)

    replace(f"bob:{KEY_B}\n")
    now[0] = KEYS_RELOAD_S / 2
    assert auth.identify(f"Bearer {KEY_A}") == "alice"  # not checked yet
    now[0] = KEYS_RELOAD_S + 1
    assert auth.identify(f"Bearer {KEY_B}") == "bob" and auth.identify(f"Bearer {KEY_A}") is None
    replace("bob:short\n")
    now[0] = 2 * KEYS_RELOAD_S + 2
    assert auth.identify(f"Bearer {KEY_B}") == "bob"
    assert "the 1 keys already loaded stay in force" in caplog.text and KEY_B not in caplog.text
