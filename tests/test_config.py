"""Configuration: defaults, environment overrides, secret files, and one clear line per mistake."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agentd.call import CallSettings
from agentd.config import BackendConfig, Config, ConfigError, DaemonConfig, load
from agentd.secret import Secret

README = Path(__file__).resolve().parent.parent / "README.md"

GOOD = """
[voipbin]
api_url = "https://api.voipbin.net/v1.0"
accesskey = "vb_testkey123"
[agent]
numbers = ["+15551234567"]
greeting = "Hi!"
[backend]
kind = "echo"
[store]
path = "agentd.db"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agentd.toml"
    path.write_text(text)
    return path


def test_good_config(tmp_path: Path) -> None:
    config = load(write(tmp_path, GOOD), env={})
    assert config.voipbin.ws_url == "wss://api.voipbin.net/v1.0/ws"
    assert config.voipbin.accesskey is not None
    assert config.voipbin.accesskey.reveal() == "vb_testkey123"
    assert "vb_testkey123" not in repr(config)
    assert config.call.greeting == "Hi!"
    assert config.call.stt_provider == "aws"
    assert config.call.cut == "restart"  # elevenlabs: flush does not cut the audio
    assert config.caller_id == "+15551234567"


MINIMAL: dict[str, dict[str, Any]] = {
    "voipbin": {"accesskey": "vb_testkey123"},
    "agent": {"numbers": ["*"]},
}


def test_every_per_call_default_comes_from_call_settings() -> None:
    config = load(None, env={}, overrides=MINIMAL)
    assert config.call == CallSettings()
    assert config.numbers == () and config.flow_id == "" and config.caller_id == ""


def test_the_system_prompt_default_is_the_documented_short_prompt() -> None:
    prompt = CallSettings().system_prompt
    assert prompt == "You are a helpful voice agent on a phone call. Answer briefly."
    assert prompt in README.read_text(encoding="utf-8")


def test_typed_sections_have_the_documented_defaults() -> None:
    config = load(None, env={}, overrides=MINIMAL)
    assert (
        config.backend
        == BackendConfig()
        == BackendConfig(
            kind="echo",
            timeout_s=15.0,
            prefix="You said:",
            base_url="https://api.openai.com/v1",
            model="gpt-4o-mini",
            api_key=None,
            temperature=0.7,
            max_tokens=300,
            tools=True,
            url="",
            callable="",
        )
    )
    assert (
        config.daemon
        == DaemonConfig()
        == DaemonConfig(
            drain_s=10.0,
            stop_sessions_on_shutdown=False,
            shutdown_goodbye="Sorry, I have to end the call now. Goodbye!",
        )
    )
    # below VoIPBIN's 17/s, burst 33: room for `agentd call --wait` and the clocks' drift
    assert config.voipbin.rate_per_s == 15.0 and config.voipbin.burst == 28
    assert (config.store_path, config.log_level, config.log_format) == ("agentd.db", "info", "auto")
    assert "raw" not in {f.name for f in dataclasses.fields(Config)}


def test_typed_sections_take_the_file_and_the_environment(tmp_path: Path) -> None:
    key = tmp_path / "backend-key"
    key.write_text("sk-from-file-1234\n")
    text = GOOD.replace(
        'kind = "echo"',
        f'kind = "openai"\ntimeout_s = 5\nmax_tokens = 99\napi_key_file = "{key}"',
    )
    text += '[daemon]\ndrain_s = 3\nshutdown_goodbye = "Bye."\n'
    env = {"AGENTD_DAEMON_STOP_SESSIONS_ON_SHUTDOWN": "yes", "AGENTD_AGENT_CUT_METHOD": "flush"}
    config = load(write(tmp_path, text), env=env)
    assert config.backend.kind == "openai"
    assert config.backend.timeout_s == 5.0 and isinstance(config.backend.timeout_s, float)
    assert config.backend.max_tokens == 99
    assert config.backend.api_key == Secret("sk-from-file-1234")
    assert "sk-from-file-1234" not in repr(config)
    assert config.daemon == DaemonConfig(3.0, True, "Bye.")
    assert isinstance(config.daemon.drain_s, float)
    assert config.call.cut_method == "flush"
    auto = load(
        write(tmp_path, GOOD.replace("[backend]", 'cut_method = "auto"\n[backend]')), env={}
    )
    assert auto.call.cut_method is None


def test_environment_overrides_every_key(tmp_path: Path) -> None:
    env = {
        "AGENTD_AGENT_GREETING": "Howdy",
        "AGENTD_AGENT_NUMBERS": "+15550000001, +15550000002",
        "AGENTD_VOIPBIN_RATE_PER_S": "5",
        "AGENTD_VOIPBIN_ACCESSKEY": "vb_fromenv",
    }
    config = load(write(tmp_path, GOOD), env=env)
    assert config.call.greeting == "Howdy"
    assert config.numbers == ("+15550000001", "+15550000002")
    assert config.voipbin.rate_per_s == 5.0
    assert config.voipbin.accesskey is not None
    assert config.voipbin.accesskey.reveal() == "vb_fromenv"


def test_every_list_key_takes_a_comma_separated_environment_value(tmp_path: Path) -> None:
    # the README's rule for lists; the keys typed "list or tuple" used to refuse the string
    env = {
        "AGENTD_AGENT_TRANSFER_NUMBERS": "+15550000009, +15550000010",
        "AGENTD_AGENT_BACKCHANNELS": "Uh-huh,mm-hmm",
    }
    config = load(write(tmp_path, GOOD), env=env)
    assert config.call.transfer_numbers == ("+15550000009", "+15550000010")
    assert config.call.backchannels == ("uh-huh", "mm-hmm")


def test_secrets_from_files_and_systemd_credentials(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("vb_fromfile\n")
    text = GOOD.replace('accesskey = "vb_testkey123"', f'accesskey_file = "{key}"')
    config = load(write(tmp_path, text), env={})
    assert config.voipbin.accesskey is not None
    assert config.voipbin.accesskey.reveal() == "vb_fromfile"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "voipbin-accesskey").write_text("vb_fromcred")
    (creds / "voipbin-password").write_text("\n")  # empty when unused; `echo >` leaves "\n"
    text = GOOD.replace('accesskey = "vb_testkey123"', "")
    config = load(write(tmp_path, text), env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert config.voipbin.accesskey is not None
    assert config.voipbin.accesskey.reveal() == "vb_fromcred"
    assert config.voipbin.password is None


def test_a_misspelt_environment_variable_is_a_warning_without_its_value() -> None:
    env = {
        "AGENTD_VOIPBIN_ACESSKEY": "vb_misspelt_value1",  # one C: was ignored without a word
        "AGENTD_GREETING": "Hi",  # the section left out
        "AGENTD_NONSENSE": "vb_other_value22",  # no close name: no guess
        "AGENTD_AGENT_GREETING": "Hello",  # known: no warning
        "AGENTD_CONFIG": "/etc/agentd/agentd.toml",
        "OTHER_PROGRAM_SETTING": "x",
    }
    config = load(None, env=env, overrides=MINIMAL)
    assert config.warnings == (
        "AGENTD_GREETING: not a setting agentd knows, ignored "
        "(did you mean AGENTD_AGENT_GREETING?)",
        "AGENTD_NONSENSE: not a setting agentd knows, ignored",
        "AGENTD_VOIPBIN_ACESSKEY: not a setting agentd knows, ignored "
        "(did you mean AGENTD_VOIPBIN_ACCESSKEY?)",
    )
    assert "vb_" not in repr(config.warnings)
    assert config.call.greeting == "Hello"


def test_a_secret_given_two_ways_is_a_warning_naming_the_one_used(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "voipbin-accesskey").write_text("vb_rotated_key\n")  # the file's key is stale
    (creds / "voipbin-token").write_text("\n")  # loaded by the unit, unused: no warning
    key = tmp_path / "key"
    key.write_text("vb_other_key\n")
    text = GOOD.replace(
        'accesskey = "vb_testkey123"', f'accesskey = "vb_testkey123"\naccesskey_file = "{key}"'
    )
    config = load(write(tmp_path, text), env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert config.warnings == (
        "voipbin.accesskey is used, voipbin.accesskey_file and the systemd credential "
        "voipbin-accesskey ignored: keep one",
    )
    (creds / "voipbin-token").write_text("a.b.c\n")
    config = load(write(tmp_path, GOOD), env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert "voipbin: a token and an access key are both set: the token is used" in config.warnings
    assert "vb_" not in repr(config.warnings)


def test_a_bom_is_stripped_and_a_non_ascii_key_refused_unechoed(tmp_path: Path) -> None:
    # Notepad saves UTF-8 with a BOM: it was sent as part of the key (401 for ever)
    key = tmp_path / "key"
    key.write_bytes(b"\xef\xbb\xbfvb_fromnotepad\r\n")
    text = GOOD.replace('accesskey = "vb_testkey123"', f'accesskey_file = "{key}"')
    config = load(write(tmp_path, text), env={})
    assert config.voipbin.accesskey == Secret("vb_fromnotepad")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "backend-api-key").write_bytes(b"\xef\xbb\xbfsk-fromcred\n")
    config = load(write(tmp_path, GOOD), env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert config.backend.api_key == Secret("sk-fromcred")
    # a pasted smart quote cannot go in a header: one line, without the key
    key.write_text("\u201cvb_quotedkey99\u201d\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text), env={})
    assert str(info.value) == (
        "voipbin.accesskey_file: has a character that is not ASCII (a pasted quote or a stray "
        "byte?); a key or token is plain ASCII"
    )
    (creds / "backend-api-key").write_text("sk-caf\u00e9-key\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^credential backend-api-key: has a character"):
        load(write(tmp_path, GOOD), env={"CREDENTIALS_DIRECTORY": str(creds)})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("[agent]", "[agent]\ncolour = 1"), "agent.colour: unknown key"),
        (("[store]", "[nonsense]\n[store]"), "nonsense: unknown section"),
        (('greeting = "Hi!"', "greeting = 5"), "agent.greeting: expected str, got int"),
        (('numbers = ["+15551234567"]', "numbers = [1]"), "agent.numbers: expected a list of"),
        (('kind = "echo"', 'kind = "gpt"'), "backend.kind: 'gpt' is not one of echo"),
        (('accesskey = "vb_testkey123"', ""), "voipbin: no credentials"),
        (
            ('accesskey = "vb_testkey123"', 'accesskey_file = "/nonexistent/key"'),
            "voipbin.accesskey_file: cannot read /nonexistent/key",
        ),
        (
            ('api_url = "https://api.voipbin.net/v1.0"', 'api_url = "ftp://x"'),
            "voipbin.api_url: not an http(s) URL",
        ),
        (("[voipbin]", "[voipbin]\nburst = -1"), "voipbin.burst: must not be negative"),
        (("[agent]", "[agent"), "not valid TOML"),
        (("[agent]", "[agent]\nchars_per_s = -1"), "agent.chars_per_s: must not be negative"),
        (("[agent]", "[agent]\nsilence_s = nan"), "agent.silence_s: must be a finite number"),
        (("[agent]", "[agent]\nmax_call_s = inf"), "agent.max_call_s: must be a finite number"),
        (("[voipbin]", "[voipbin]\ntimeout_s = 0"), "voipbin.timeout_s: must be more than 0"),
        (('kind = "echo"', 'kind = "echo"\ntimeout_s = 0'), "backend.timeout_s: must be more"),
        # where 0 turns most things off, these two would hang up every call at its greeting /
        # ask VoIPBIN about every call without a pause, spending the account's whole budget
        (
            ("[agent]", "[agent]\nmax_call_s = 0"),
            "agent.max_call_s: must be more than 0 (0 would hang every call up at once",
        ),
        (
            ("[agent]", "[agent]\nwatch_s = 0"),
            "agent.watch_s: must be more than 0 (0 would ask VoIPBIN about every call",
        ),
        (('kind = "echo"', 'kind = "http"'), "backend.url: the http backend needs the URL"),
        (('kind = "echo"', 'kind = "python"'), "backend.callable: expected 'module:function'"),
        (
            ('kind = "echo"', 'kind = "openai"\nbase_url = "ftp://x"'),
            "backend.base_url: not an http(s) URL",
        ),
        (("[store]", '[daemon]\ndrain_s = "soon"\n[store]'), "daemon.drain_s: expected int or"),
        (
            ("[voipbin]", '[voipbin]\nusername = "me"'),
            "voipbin.password: username is set but no password",
        ),
        (('accesskey = "vb_testkey123"', 'accesskey = "a.b.c"'), "this looks like a JWT"),
        (
            ('api_url = "https://api.voipbin.net/v1.0"', 'ws_url = "https://x/ws"'),
            "voipbin.ws_url: not a ws(s) URL",
        ),
    ],
)
def test_mistakes_name_the_key(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        load(write(tmp_path, GOOD.replace(*change)), env={})
    assert message in str(info.value)


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "NaN"])
def test_a_number_from_the_environment_must_be_finite(tmp_path: Path, raw: str) -> None:
    with pytest.raises(ConfigError, match=r"agent\.end_of_turn_s: must be a finite number"):
        load(write(tmp_path, GOOD), env={"AGENTD_AGENT_END_OF_TURN_S": raw})


def test_a_misspelt_variable_is_named_in_the_error_it_causes(tmp_path: Path) -> None:
    without_key = GOOD.replace('accesskey = "vb_testkey123"', "")
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, without_key), env={"AGENTD_VOIPBIN_ACESSKEY": "vb_misspelt_key"})
    message = str(info.value)
    assert message.startswith("voipbin: no credentials")
    assert "did you mean AGENTD_VOIPBIN_ACCESSKEY?" in message
    assert "vb_misspelt_key" not in message


NUMBERS = 'numbers = ["+15551234567"]'


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ((NUMBERS, ""), "agent.numbers: not set"),
        ((NUMBERS, "numbers = []"), "agent.numbers: not set"),
        ((NUMBERS, 'numbers = ["+1 555 123 4567"]'), "agent.numbers: '+1 555 123 4567' is not"),
        ((NUMBERS, 'numbers = ["15551234567"]'), "agent.numbers: '15551234567' is not a phone"),
        ((NUMBERS, 'numbers = ["*", "+15551234567"]'), 'agent.numbers: "*" (every call) cannot'),
        ((NUMBERS, f'{NUMBERS}\ncaller_id = "me"'), "agent.caller_id: 'me' is not a phone"),
        ((NUMBERS, f'{NUMBERS}\nstt_provider = "google"'), "agent.stt_provider: 'google' is not"),
        ((NUMBERS, f'{NUMBERS}\ntts_provider = "polly"'), "agent.tts_provider: 'polly' is not"),
        (
            (NUMBERS, f'{NUMBERS}\ntransfer_numbers = ["1-900-PREMIUM"]'),
            "agent.transfer_numbers: '1-900-PREMIUM' is not a phone number",
        ),
        ((NUMBERS, f'{NUMBERS}\nflow_id = "my-flow"'), "agent.flow_id: 'my-flow' is not a flow id"),
    ],
)
def test_numbers_and_providers_must_be_valid(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, GOOD.replace(*change)), env={})
    assert str(info.value).startswith(message)


def test_transfers_are_off_unless_numbers_are_allowed(tmp_path: Path) -> None:
    assert load(write(tmp_path, GOOD), env={}).call.transfer_numbers == ()
    allowed = f'{NUMBERS}\ntransfer_numbers = ["+15550009999"]\nfinal_hold_s = 0.3'
    allowed += '\nbackchannels = ["Gotcha"]'
    config = load(write(tmp_path, GOOD.replace(NUMBERS, allowed)), env={})
    assert config.call.transfer_numbers == ("+15550009999",)
    assert config.call.final_hold_s == 0.3
    assert config.call.backchannels == ("gotcha",)


def test_the_cli_names_agent_numbers_when_they_are_missing(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace(NUMBERS, ""))
    proc = subprocess.run(
        [sys.executable, "-m", "agentd", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("agentd: config error: agent.numbers: not set")
    assert '["*"] for every call of the account' in proc.stderr


def test_a_star_serves_every_call_and_leaves_no_caller_id(tmp_path: Path) -> None:
    config = load(write(tmp_path, GOOD.replace(NUMBERS, 'numbers = ["*"]')), env={})
    assert config.numbers == ()  # what the dispatcher reads as "every call"
    assert config.caller_id == ""  # `agentd call` needs --from or agent.caller_id
    env = {"AGENTD_AGENT_NUMBERS": "*"}
    assert load(write(tmp_path, GOOD), env=env).numbers == ()


@pytest.mark.parametrize("stt", ["aws", "gcp", ""])
@pytest.mark.parametrize("tts", ["elevenlabs", "gcp", "aws"])
def test_the_providers_voipbin_knows_are_accepted(tmp_path: Path, stt: str, tts: str) -> None:
    text = GOOD.replace(NUMBERS, f'{NUMBERS}\nstt_provider = "{stt}"\ntts_provider = "{tts}"')
    config = load(write(tmp_path, text), env={})
    assert (config.call.stt_provider, config.call.tts_provider) == (stt, tts)
    # no voice set: VoIPBIN picks the provider's own default voice (Joanna for aws, ...)
    assert config.call.voice_id == "" and config.warnings == ()


def test_a_voice_of_another_provider_is_kept_with_a_warning(tmp_path: Path) -> None:
    eleven = GOOD.replace(
        NUMBERS, f'{NUMBERS}\ntts_provider = "aws"\nvoice_id = "21m00Tcm4TlvDq8ikWAM"'
    )
    config = load(write(tmp_path, eleven), env={})
    assert config.call.voice_id == "21m00Tcm4TlvDq8ikWAM"  # set explicitly: kept
    (warning,) = config.warnings
    assert warning.startswith("agent.voice_id: '21m00Tcm4TlvDq8ikWAM' looks like a voice id of ")
    assert "elevenlabs but tts_provider is 'aws'" in warning
    for provider, voice in [("aws", "Joanna"), ("gcp", "en-US-Chirp3-HD-Charon")]:
        text = GOOD.replace(
            NUMBERS, f'{NUMBERS}\ntts_provider = "{provider}"\nvoice_id = "{voice}"'
        )
        assert load(write(tmp_path, text), env={}).warnings == ()
    gcp_voice_on_elevenlabs = GOOD.replace(NUMBERS, f'{NUMBERS}\nvoice_id = "en-US-Wavenet-D"')
    assert "a voice id of gcp" in load(write(tmp_path, gcp_voice_on_elevenlabs), env={}).warnings[0]


@pytest.mark.parametrize(("provider", "english"), [("aws", "Joanna"), ("gcp", "en-US-Chirp3")])
def test_no_voice_for_a_language_the_default_voice_cannot_speak_is_a_warning(
    tmp_path: Path, provider: str, english: str
) -> None:
    # VoIPBIN's per-language voice tables never match a language code: its default is English
    text = GOOD.replace(NUMBERS, f'{NUMBERS}\ntts_provider = "{provider}"\nlanguage = "de-DE"')
    (warning,) = load(write(tmp_path, text), env={}).warnings
    assert warning.startswith(f"agent.voice_id: not set, so VoIPBIN uses its default {provider}")
    assert english in warning and "set a de-DE voice" in warning
    multilingual = GOOD.replace(NUMBERS, f'{NUMBERS}\nlanguage = "de-DE"')  # elevenlabs
    assert load(write(tmp_path, multilingual), env={}).warnings == ()


def test_the_language_is_a_bcp47_tag_in_its_canonical_case(tmp_path: Path) -> None:
    # VoIPBIN keeps a transcribe's language so; a tag compared as written, after a 409, would
    # not find the transcribe VoIPBIN says is running
    for written, kept in (("en_us", "en-US"), ("KO-kr", "ko-KR"), ("zh-hant-tw", "zh-Hant-TW")):
        text = GOOD.replace(NUMBERS, f'{NUMBERS}\nlanguage = "{written}"')
        assert load(write(tmp_path, text), env={}).call.language == kept
    # VoIPBIN would not refuse these: it would transcribe them as en-US
    for bad in ("english", "", "en US"):
        text = GOOD.replace(NUMBERS, f'{NUMBERS}\nlanguage = "{bad}"')
        with pytest.raises(ConfigError, match=r"agent\.language: .* is not a BCP 47 language tag"):
            load(write(tmp_path, text), env={})


def test_overrides_are_checked_like_the_file() -> None:
    with pytest.raises(ConfigError, match=r"agent\.tts_provider: 'polly' is not one of"):
        load(
            None,
            env={},
            overrides={**MINIMAL, "agent": {"numbers": ["*"], "tts_provider": "polly"}},
        )


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("AGENTD_VOIPBIN_RATE_PER_S", "lots", "expected a number, got 'lots'"),
        ("AGENTD_AGENT_HISTORY_LIMIT", "1.5", "expected a whole number, got '1.5'"),
        ("AGENTD_AGENT_TURN_MARKER", "maybe", "expected true or false, got 'maybe'"),
    ],
)
def test_bad_environment_value_names_the_variable(
    tmp_path: Path, name: str, raw: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, GOOD), env={name: raw})
    assert str(info.value) == f"{name}: {message}"


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("AGENTD_LOG_LEVEL", "loud", "log.level: 'loud' is not one of"),
        ("AGENTD_AGENT_NUMBERS", "", "agent.numbers: not set"),
        ("AGENTD_METRICS_LISTEN", "127.0.0.1:99999", "metrics.listen: expected host:port"),
    ],
)
def test_a_bad_value_from_the_environment_names_its_variable(
    tmp_path: Path, name: str, raw: str, message: str
) -> None:
    # the file may not have the key at all, or a good value of it (numbers, here): the
    # operator must be sent to the unit's Environment=, not to agentd.toml
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, GOOD), env={name: raw})
    text = str(info.value)
    assert text.startswith(message) and text.endswith(f"(set by {name})")


def test_a_config_path_that_cannot_be_read_as_text_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="a directory, not a config file"):
        load(tmp_path, env={})
    binary = tmp_path / "utf16.toml"
    binary.write_bytes(b"\xff\xfe[\x00a\x00]\x00")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load(binary, env={})


@pytest.mark.parametrize(
    ("key", "url"),
    [
        ("api_url", "htps://me:SECRETPW@api.voipbin.net/v1.0"),
        ("ws_url", "https://api.voipbin.net/v1.0/ws?accesskey=vb_INURL"),
        ("api_url", "me:SECRETPW@api.voipbin.net"),
    ],
)
def test_a_mistyped_url_is_not_echoed(tmp_path: Path, key: str, url: str) -> None:
    """A URL that fails to parse may hold a password or a key: the error names its scheme."""
    text = GOOD.replace('api_url = "https://api.voipbin.net/v1.0"', f'{key} = "{url}"')
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text), env={})
    assert f"voipbin.{key}: not a" in str(info.value)
    assert "SECRETPW" not in str(info.value) and "vb_INURL" not in str(info.value)


@pytest.mark.parametrize(
    ("key", "url", "what"),
    [
        ("api_url", "https://me:SECRETPW@api.voipbin.net/v1.0", "user or password"),
        ("api_url", "https://SECRETPW@api.voipbin.net/v1.0", "user or password"),
        ("api_url", "https://api.voipbin.net/v1.0?accesskey=vb_INURL", "query string"),
        ("api_url", "https://api.voipbin.net/v1.0#vb_INURL", "query string"),
        ("ws_url", "wss://me:SECRETPW@api.voipbin.net/v1.0/ws", "user or password"),
        ("ws_url", "wss://api.voipbin.net/v1.0/ws?accesskey=vb_INURL", "query string"),
    ],
)
def test_a_credential_in_a_voipbin_url_is_refused_unechoed(
    tmp_path: Path, key: str, url: str, what: str
) -> None:
    """A well-formed URL with a key in it would be printed by check-config and logged at start:
    it is refused, and the error does not quote it."""
    text = GOOD.replace("[voipbin]\n", f'[voipbin]\n{key} = "{url}"\n', 1)
    if key == "api_url":
        text = text.replace('api_url = "https://api.voipbin.net/v1.0"\n', "", 1)
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text), env={})
    message = str(info.value)
    assert message.startswith(f"voipbin.{key}: must not carry a {what}")
    assert "\n" not in message
    assert "SECRETPW" not in message and "vb_INURL" not in message
    # the environment is checked the same way
    env_text = GOOD if key == "api_url" else text.replace(f'{key} = "{url}"\n', "")
    with pytest.raises(ConfigError, match=f"voipbin.{key}: must not carry"):
        load(write(tmp_path, env_text), env={f"AGENTD_VOIPBIN_{key.upper()}": url})


def test_cli_reports_a_bad_config_in_one_line_with_exit_2(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace('greeting = "Hi!"', "greeting = 5"))
    proc = subprocess.run(
        [sys.executable, "-m", "agentd", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "agentd: config error: agent.greeting: expected str, got int"
    assert "Traceback" not in proc.stderr + proc.stdout


def test_cli_missing_config_file(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agentd", "run", "--config", str(tmp_path / "nope.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "no such config file" in proc.stderr


def test_version() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agentd", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("agentd ")


def test_lease_s_and_the_replica_name_for_several_agentd_on_postgresql() -> None:
    config = load(None, env={}, overrides=MINIMAL)
    assert (config.lease_s, config.replica_name) == (3.0, "")
    config = load(None, env={}, overrides={**MINIMAL, "store": {"lease_s": 5, "replica": "box-a"}})
    assert (config.lease_s, config.replica_name) == (5.0, "box-a")
    for bad in (0.5, 61):
        with pytest.raises(ConfigError, match=r"store\.lease_s: .* out of range"):
            load(None, env={}, overrides={**MINIMAL, "store": {"lease_s": bad}})


def test_store_keep_days_defaults_to_30_and_0_keeps_for_ever() -> None:
    assert load(None, env={}, overrides=MINIMAL).store_keep_days == 30.0
    config = load(None, env={"AGENTD_STORE_KEEP_DAYS": "0"}, overrides=MINIMAL)
    assert config.store_keep_days == 0.0
    with pytest.raises(ConfigError, match=r"store\.keep_days: must not be negative"):
        load(None, env={}, overrides={**MINIMAL, "store": {"keep_days": -1}})


# ---- [store] url: PostgreSQL ------------------------------------------------------------------


def with_store(**store: object) -> dict[str, dict[str, Any]]:
    return {**MINIMAL, "store": store}


def test_sqlite_stays_the_default() -> None:
    config = load(None, env={}, overrides=MINIMAL)
    assert config.store_path == "agentd.db" and config.store_url is None


def test_a_postgresql_url_keeps_its_password_a_secret(tmp_path: Path) -> None:
    url = "postgresql://agentd:s3cret%2Fpw-123@db.example:5432/agentd?sslmode=require"
    config = load(None, env={}, overrides=with_store(url=url))
    assert config.store_path == ""  # no SQLite file
    assert config.store_url is not None
    assert config.store_url.dsn == "postgresql://agentd@db.example:5432/agentd?sslmode=require"
    assert config.store_url.password == Secret("s3cret/pw-123")
    for shown in (repr(config), str(config.store_url), repr(config.store_url)):
        assert "s3cret" not in shown
    # postgres:// too, a password in the query, and the path the systemd unit sets is ignored
    env = {
        "AGENTD_STORE_URL": "postgres://agentd@/agentd?host=/run/postgresql&password=qwerty-99",
        "AGENTD_STORE_PATH": "/var/lib/agentd/agentd.db",
    }
    config = load(None, env=env, overrides=MINIMAL)
    assert config.store_url is not None and config.store_path == ""
    assert config.store_url.dsn == "postgres://agentd@/agentd?host=%2Frun%2Fpostgresql"
    assert config.store_url.password == Secret("qwerty-99")


def test_the_default_store_is_in_systemds_state_directory(tmp_path: Path) -> None:
    assert load(None, env={}, overrides=MINIMAL).store_path == "agentd.db"
    env = {"STATE_DIRECTORY": "/var/lib/agentd:/var/lib/other"}  # the first of several
    assert load(None, env=env, overrides=MINIMAL).store_path == "/var/lib/agentd/agentd.db"
    # the config file, then the environment, win over the default
    assert load(None, env=env, overrides=with_store(path="")).store_path == ""
    both = {**env, "AGENTD_STORE_PATH": "/srv/a.db"}
    assert load(None, env=both, overrides=MINIMAL).store_path == "/srv/a.db"
    # and the default beside a url is no conflict
    url = "postgresql://agentd@db/agentd"
    assert load(None, env=env, overrides=with_store(url=url)).store_path == ""


def test_a_store_password_from_a_file_or_a_credential(tmp_path: Path) -> None:
    (tmp_path / "pgpass").write_text("from-a-file-77\n")
    store = {"url": "postgresql://agentd@db/agentd", "password_file": str(tmp_path / "pgpass")}
    config = load(None, env={}, overrides=with_store(**store))
    assert config.store_url is not None
    assert config.store_url.password == Secret("from-a-file-77")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "store-password").write_text("from-systemd-88\n")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    config = load(None, env=env, overrides=with_store(url="postgresql://agentd@db/agentd"))
    assert config.store_url is not None
    assert config.store_url.password == Secret("from-systemd-88")


@pytest.mark.parametrize(
    ("store", "message"),
    [
        (
            {"url": "mysql://agentd:hunter2-secret@db/agentd"},
            r"store\.url: expected a postgresql:// \(or postgres://\) URL, got a 'mysql' URL",
        ),
        ({"url": "db.example:5432/agentd"}, r"store\.url: expected a postgresql://"),
        ({"url": "postgresql://a:hunter2-secret@db:99999/x"}, r"store\.url: not a valid URL"),
        (
            {"url": "postgresql://agentd@db/agentd", "path": "/var/lib/agentd/agentd.db"},
            r"store: both url \(PostgreSQL\) and path \(SQLite\) are set",
        ),
        ({"url": "postgresql://agentd@db/agentd", "path": ""}, r"store: both url"),
        ({"password": "hunter2-secret"}, r"store\.password: only used with store\.url"),
        (
            {"url": "postgresql://a:hunter2-secret@db/x", "password": "other-secret"},
            r"store\.url: the URL has a password and so has store\.password",
        ),
    ],
)
def test_store_mistakes_name_the_key_and_never_the_password(
    store: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load(None, env={}, overrides=with_store(**store))
    assert "hunter2" not in str(err.value)


def test_the_default_path_beside_a_url_is_no_conflict() -> None:
    config = load(None, env={}, overrides=with_store(url="postgresql://db/x", path="agentd.db"))
    assert config.store_url is not None and config.store_path == ""


def test_a_url_without_asyncpg_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import agentd.config

    monkeypatch.setattr(agentd.config, "postgres_installed", lambda: False)
    with pytest.raises(ConfigError) as err:
        load(None, env={}, overrides=with_store(url="postgresql://db/x"))
    # agentd's own interpreter: a bare `pip install 'agentd[postgres]'` elsewhere fetches an
    # unrelated PyPI package of that name
    assert str(err.value) == (
        "store.url: PostgreSQL needs the asyncpg package, which is not installed: in agentd's "
        "source tree (its constraints.txt pins the versions agentd was tested with) run "
        f"{sys.executable} -m pip install -c constraints.txt asyncpg"
    )
    assert load(None, env={}, overrides=MINIMAL).store_path == "agentd.db"  # SQLite needs none


def test_the_commands_that_install_a_missing_extra_are_the_readmes() -> None:
    # pinned by constraints.txt as README's Install is: without it pip takes the newest of
    # each, versions no test ran with
    from agentd.config import OTEL_MISSING, POSTGRES_MISSING

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    for message in (OTEL_MISSING, POSTGRES_MISSING):
        command = message.rpartition(f"{sys.executable} -m ")[2]
        assert command.startswith("pip install -c constraints.txt "), message
        assert f"/opt/agentd/venv/bin/{command}" in readme, command


def test_a_negative_history_limit_is_refused(tmp_path: Path) -> None:
    text = GOOD.replace(NUMBERS, f"{NUMBERS}\nhistory_limit = -1")
    with pytest.raises(ConfigError, match=r"agent\.history_limit: must not be negative"):
        load(write(tmp_path, text), env={})


def test_a_drain_longer_than_the_units_stop_timeout_is_a_warning() -> None:
    # systemd kills agentd TimeoutStopSec (30 s) after the SIGTERM: a drain past it is cut by
    # SIGKILL, its goodbyes unsaid and, without a store, its sessions left billing
    long = load(None, env={}, overrides={**MINIMAL, "daemon": {"drain_s": 28}})
    assert long.warnings == (
        "daemon.drain_s: 28 s, and up to 5 s more to hang up the calls left, ends after the "
        "systemd unit's TimeoutStopSec (30 s), which kills agentd mid-drain: lower it, or "
        "raise TimeoutStopSec in a drop-in (systemctl edit agentd)",
    )
    assert load(None, env={}, overrides={**MINIMAL, "daemon": {"drain_s": 20}}).warnings == ()
