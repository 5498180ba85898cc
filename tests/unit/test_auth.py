import hashlib
import hmac
import re

import pytest

import tokenvault.auth as auth
from tokenvault.auth import (
    ADMIN,
    ALL_SCOPES,
    DETOKENIZE,
    MAX_PRESENTED_KEY_CHARS,
    TOKENIZE,
    ApiKeyEntry,
    ApiKeyTable,
    ApiKeyTableError,
    Principal,
    bearer_credentials,
    generate_api_key,
    hash_api_key,
)


def _entry(name: str, key: str, *scopes: str) -> ApiKeyEntry:
    return ApiKeyEntry(name=name, sha256=hash_api_key(key), scopes=frozenset(scopes))


def test_generated_keys_have_the_documented_shape_and_are_unique() -> None:
    keys = {generate_api_key() for _ in range(200)}
    assert len(keys) == 200
    for key in keys:
        assert re.fullmatch(r"tvk_[A-Za-z0-9_-]{43}", key)


def test_hash_is_sha256_hex_of_the_key() -> None:
    assert hash_api_key("tvk_abc") == hashlib.sha256(b"tvk_abc").hexdigest()


def test_scope_constants() -> None:
    assert (ADMIN, TOKENIZE, DETOKENIZE) == ("admin", "tokenize", "detokenize")
    assert ALL_SCOPES == {"admin", "tokenize", "detokenize", "detokenize_masked", "delete", "retokenize"}


def test_authenticate_returns_the_matching_principal() -> None:
    admin_key, tokenizer_key = generate_api_key(), generate_api_key()
    table = ApiKeyTable([_entry("admin", admin_key, ADMIN), _entry("tok", tokenizer_key, TOKENIZE, DETOKENIZE)])
    assert table.authenticate(admin_key) == Principal("admin", frozenset({ADMIN}))
    principal = table.authenticate(tokenizer_key)
    assert principal is not None and principal.name == "tok"
    assert principal.has_scope(TOKENIZE) and principal.has_scope(DETOKENIZE) and not principal.has_scope(ADMIN)


@pytest.mark.parametrize(
    "presented",
    [None, "", "tvk_wrong", "x" * (MAX_PRESENTED_KEY_CHARS + 1), "tvk_\ud800", 42],
)
def test_authenticate_refuses_unknown_missing_and_hostile_keys(presented: object) -> None:
    table = ApiKeyTable([_entry("admin", generate_api_key(), ADMIN)])
    assert table.authenticate(presented) is None  # type: ignore[arg-type]


def test_overlong_key_is_refused_even_if_its_hash_is_stored() -> None:
    long_key = "k" * (MAX_PRESENTED_KEY_CHARS + 1)
    table = ApiKeyTable([_entry("long", long_key, ADMIN)])
    assert table.authenticate(long_key) is None
    at_limit = "k" * MAX_PRESENTED_KEY_CHARS
    assert ApiKeyTable([_entry("edge", at_limit, ADMIN)]).authenticate(at_limit) is not None


def counted_comparisons(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that gets one item per hmac.compare_digest the auth module makes from now on."""
    calls: list[int] = []
    real_compare = hmac.compare_digest

    def counting_compare(first: bytes, second: bytes) -> bool:
        calls.append(1)
        return real_compare(first, second)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting_compare)
    return calls


def test_every_stored_hash_is_compared_without_early_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = [generate_api_key() for _ in range(5)]
    table = ApiKeyTable([_entry(f"k{index}", key, ADMIN) for index, key in enumerate(keys)])
    calls = counted_comparisons(monkeypatch)
    for presented in (keys[0], keys[4], "tvk_nobody"):
        calls.clear()
        table.authenticate(presented)
        assert len(calls) == 5


def test_entries_are_validated() -> None:
    good_hash = hash_api_key("k")
    with pytest.raises(ApiKeyTableError):
        ApiKeyEntry("bad name", good_hash, frozenset({ADMIN}))
    with pytest.raises(ApiKeyTableError):
        ApiKeyEntry("a", good_hash.upper(), frozenset({ADMIN}))
    with pytest.raises(ApiKeyTableError):
        ApiKeyEntry("a", good_hash[:-1], frozenset({ADMIN}))
    with pytest.raises(ApiKeyTableError):
        ApiKeyEntry("a", good_hash, frozenset())
    with pytest.raises(ApiKeyTableError) as caught:
        ApiKeyEntry("a", good_hash, frozenset({"root"}))
    assert good_hash not in str(caught.value)


def test_no_bootstrap_key_takes_the_identity_of_a_runtime_key() -> None:
    """A runtime key's identity is key-<its id>; a bootstrap key so named would share its idempotency
    keys, rate buckets and body slots. Such a name is refused; a name that only starts alike is not."""
    runtime = Principal("anything", frozenset({TOKENIZE}), key_id="0123456789abcdef")
    assert runtime.identity == "key-0123456789abcdef"
    with pytest.raises(ApiKeyTableError, match="how the vault names a runtime key"):
        _entry(runtime.identity, generate_api_key(), TOKENIZE)
    for name in ("key-rotation-bot", "key-0123456789ABCDEF", "key-0123456789abcdef0", "mykey-0123456789abcdef"):
        assert _entry(name, generate_api_key(), TOKENIZE).name == name


def test_an_api_key_pasted_as_a_name_is_refused_without_echoing_it() -> None:
    """A key's name is logged, counted in metrics, audited and echoed in errors: a name that starts as the
    vault's keys do (the key itself pasted where its name goes) is refused, and the error does not repeat
    it. A name that only contains the prefix is a name."""
    for pasted in (generate_api_key(), "tvk1_" + "a" * 40, "tvk_x"):
        with pytest.raises(ApiKeyTableError, match="may not start with 'tvk_' or 'tvk1_'") as raised:
            _entry(pasted, generate_api_key(), TOKENIZE)
        assert pasted not in str(raised.value)
    for name in ("tvk", "my-tvk_bot", "TVK_reader"):
        assert _entry(name, generate_api_key(), TOKENIZE).name == name


def test_table_refuses_duplicate_names_and_duplicate_keys() -> None:
    key = generate_api_key()
    with pytest.raises(ApiKeyTableError, match="twice"):
        ApiKeyTable([_entry("a", key, ADMIN), _entry("a", generate_api_key(), ADMIN)])
    with pytest.raises(ApiKeyTableError, match="same hash"):
        ApiKeyTable([_entry("a", key, ADMIN), _entry("b", key, TOKENIZE)])


def test_repr_shows_names_only() -> None:
    key = generate_api_key()
    table = ApiKeyTable([_entry("admin", key, ADMIN)])
    assert key not in repr(table) and hash_api_key(key) not in repr(table)
    assert "admin" in repr(table)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("Bearer tvk_abc", "tvk_abc"),
        ("bearer   tvk_abc  ", "tvk_abc"),
        ("Basic dXNlcjpwYXNz", None),
        ("Bearer", None),
        ("Bearer ", None),
    ],
)
def test_bearer_credentials(header: str | None, expected: str | None) -> None:
    assert bearer_credentials(header) == expected


def test_a_salted_bootstrap_entry_authenticates_and_its_digest_depends_on_the_salt() -> None:
    key = generate_api_key()
    salt, digest = auth.salted_api_key_hash(key)
    again_salt, again_digest = auth.salted_api_key_hash(key)
    assert salt != again_salt and digest != again_digest and digest != hash_api_key(key)
    assert digest == hmac.new(bytes.fromhex(salt), key.encode(), hashlib.sha256).hexdigest()
    table = ApiKeyTable([ApiKeyEntry("salted", digest, frozenset({ADMIN}), salt=salt),
                         ApiKeyEntry("plain", hash_api_key("tvk_other"), frozenset({ADMIN})),
                         ApiKeyEntry("same-key-other-salt", again_digest, frozenset({ADMIN}), salt=again_salt)])
    assert table.authenticate(key).name == "same-key-other-salt"  # the last match wins, as before
    assert ApiKeyTable([ApiKeyEntry("salted", digest, frozenset({ADMIN}), salt=salt)]).authenticate(key).name == "salted"
    assert table.authenticate("tvk_other").name == "plain"
    assert table.authenticate(generate_api_key()) is None
    with pytest.raises(ApiKeyTableError):
        ApiKeyEntry("bad-salt", digest, frozenset({ADMIN}), salt="XYZ")


def test_a_key_that_matched_is_found_again_without_the_loop_and_only_matches_are_kept(
        monkeypatch: pytest.MonkeyPatch) -> None:
    keys = [generate_api_key() for _ in range(3)]
    table = ApiKeyTable([_entry(f"k{index}", key, ADMIN) for index, key in enumerate(keys)])
    first = table.authenticate(keys[1])
    calls = counted_comparisons(monkeypatch)
    assert table.authenticate(keys[1]) == first and first is not None and first.name == "k1"
    assert calls == []  # found by its SHA-256
    for _ in range(100):
        assert table.authenticate(generate_api_key()) is None  # a guess still runs every comparison
    assert len(calls) == 300
    assert len(table._matched) == 1  # guesses are never kept
