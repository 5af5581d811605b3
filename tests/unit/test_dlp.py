"""Data protection's detectors (``coordinator.core.dlp``) and how a backend body is protected
(``coordinator.market.forward.protect``): each detector finds its kind, nothing fires on a corpus of
ordinary prompts, redaction is consistent within a request, and inline media is left alone."""

from __future__ import annotations

import msgspec

from coordinator.core import dlp
from coordinator.market.forward import protect

FOUND = {
    dlp.SECRET: [
        "my key is sk-proj-abcdefghijklmnopqrstuvwxyz012345",
        "AKIAIOSFODNN7EXAMPLE is the access key",
        "token ghp_abcdefghijklmnopqrstuvwxyz0123456789AB",
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----",
        "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
        "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
        "DATABASE_URL=postgres://admin:hunter2@db.internal:5432/app",
        "stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc",
        "xoxb-1234567890-abcdefghijkl",
        "pool_live_" + "a" * 40,
    ],
    dlp.CARD: ["card 4111 1111 1111 1111 exp 12/29", "5500-0000-0000-0004", "pay with 378282246310005"],
    dlp.IBAN: ["IBAN GB82 WEST 1234 5698 7654 32 please", "DE89370400440532013000"],
    dlp.EMAIL: ["write to jane.doe+work@example.co.uk today"],
    dlp.PHONE: ["call me at +1 650-253-0000", "+44 20 7946 0958 is the office", "+33 1 42 68 53 00"],
}

# Ordinary prompts no detector may fire on: code, prose, numbers that are not cards.
ORDINARY = [
    "Write a Python function that returns the nth Fibonacci number.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "SELECT id, email_count FROM users WHERE created_at > '2026-01-01' ORDER BY id LIMIT 50;",
    "The order number is 1234567890123456 and it shipped on 2026-12-03.",
    "Our tracking id is 9400 1000 0000 0000 0000 00, see you soon.",
    "Commit 3f3df55a9c1e2b4d5f6a7b8c9d0e1f2a3b4c5d6e fixed the race.",
    "uuid 123e4567-e89b-12d3-a456-426614174000 is the request id",
    "Version 1.2.3-rc.4+build.5 is out; upgrade with pip install foo==1.2.3",
    "The IP address 192.168.10.254 answers on port 8080.",
    "Visit https://example.com/docs/getting-started?ref=home#intro for more.",
    "git clone git@github.com:owner/repo.git && cd repo",
    "Temperature rose from -3.5 to +12.25 degrees between 06:00 and 14:30.",
    "Pi is 3.14159265358979323846 to twenty decimals.",
    "The sum 12345 + 67890 = 80235, and 2^64 = 18446744073709551616.",
    "Meet me at 5 pm on 12/03/2026 in room 4B.",
    "She said: 'The quick brown fox jumps over the lazy dog.'",
    "Translate 'good morning' into French, Spanish and German.",
    "Summarise the plot of Hamlet in three sentences.",
    "import numpy as np\nx = np.arange(1000000).reshape(1000, 1000)\nprint(x.sum())",
    "const key = process.env.API_KEY; // read from the environment, never hard-coded",
    "password = input('Password: ')  # ask the user, do not store",
    "The ISBN is 978-3-16-148410-0.",
    "Call the function with +5 and -7 and return the product.",
    "Item SKU 00012345678905 costs $19.99 plus 8.25% tax.",
    "curl -s http://localhost:8080/v1/models | jq '.data[].id'",
    "Base64 of 'hello' is aGVsbG8=, of 'world' is d29ybGQ=.",
    "SHA-256 of the file: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "Phone extensions 2041 and 2042 are on the third floor.",
    "The train leaves at 08:15 from platform 9 3/4.",
    "Write a haiku about autumn leaves falling on a quiet pond.",
    "Explain the difference between TCP and UDP with an example.",
    "for (let i = 0; i < 10; i++) { console.log(i * i); }",
    "CREATE INDEX ix_users_email ON users (email);",
    "Latitude 48.8584, longitude 2.2945: what landmark is there?",
    "Regex for an email is usually something like [a-z]+@[a-z]+\\.[a-z]+",
    "Set DATABASE_URL to your connection string (with your own password) before running.",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16",
    "The matrix [[1, 0, 0], [0, 1, 0], [0, 0, 1]] is the identity.",
    "Dear team, the quarterly report is attached; revenue grew 12% to 4.2 million.",
    "Use the @decorator syntax: @app.get('/items/{item_id}')",
]


def test_each_detector_finds_its_kind() -> None:
    for name, texts in FOUND.items():
        for text in texts:
            assert dlp.find(text)[name] >= 1, (name, text)


def test_no_detector_fires_on_ordinary_prompts() -> None:
    fired = {text: dlp.find(text) for text in ORDINARY}
    assert {text: found for text, found in fired.items() if found} == {}
    assert len(ORDINARY) >= 40


def test_redaction_is_consistent_within_a_request() -> None:
    redact = dlp.Redactor((dlp.SECRET, dlp.EMAIL))
    first = redact("mail a@example.com and b@example.com, then a@example.com again")
    second = redact("key sk-abcdefghijklmnopqrstuvwxyz and a@example.com")
    assert first == "mail [EMAIL_1] and [EMAIL_2], then [EMAIL_1] again"
    assert second == "key [SECRET_1] and [EMAIL_1]"
    assert redact.found == {dlp.EMAIL: 4, dlp.SECRET: 1}


def test_protect_redacts_message_text_and_leaves_media_and_roles_alone() -> None:
    image = "data:image/png;base64," + "QUJD" * 40 + "jane@example.com"
    body = msgspec.json.encode(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "reply to jane@example.com"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "my card 4111 1111 1111 1111, mail jane@example.com"},
                        {"type": "image_url", "image_url": {"url": image}},
                    ],
                },
            ],
        }
    )
    protected = protect(body, {dlp.EMAIL: dlp.REDACT, dlp.CARD: dlp.PRIVATE})
    sent = msgspec.json.decode(protected.body)
    assert sent["messages"][0] == {"role": "system", "content": "reply to [EMAIL_1]"}
    assert sent["messages"][1]["content"][0]["text"] == "my card 4111 1111 1111 1111, mail [EMAIL_1]"
    assert sent["messages"][1]["content"][1]["image_url"]["url"] == image  # media is not text
    assert protected.found == {dlp.EMAIL: 2, dlp.CARD: 1} and protected.private == dlp.CARD
    assert protected.blocked is None
    blocked = protect(body, {dlp.CARD: dlp.BLOCK, dlp.EMAIL: dlp.REDACT})
    assert blocked.blocked == dlp.CARD and blocked.body == body  # nothing leaves, so nothing is redacted


def test_protect_reads_every_text_a_backend_reads_and_no_tag_hides_one() -> None:
    """A message tagged as audio, text that starts with ``data:``, the ``user`` field, a tool's
    description, a JSON schema: all text to a backend, all scanned; a match split across content
    parts cannot be redacted part by part, so it is refused."""
    mail = "zed@example.com"
    body = msgspec.json.encode(
        {
            "model": "m",
            "user": mail,
            "messages": [
                {"role": "user", "type": "input_audio", "content": f"hidden {mail}"},
                {"role": "user", "content": f"data: {{'email': '{mail}'}}"},
            ],
            "tools": [{"type": "function", "function": {"name": "f", "description": f"mail {mail}"}}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "description": mail}},
        }
    )
    protected = protect(body, {dlp.EMAIL: dlp.REDACT})
    assert protected.found == {dlp.EMAIL: 5} and mail.encode() not in protected.body
    assert msgspec.json.decode(protected.body)["messages"][0]["type"] == "input_audio"  # vocabularies untouched

    card = "4111 1111 1111 1111"
    split = msgspec.json.encode(
        {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": f"pay {card[:9]}"}, {"type": "text", "text": card[9:]}],
                }
            ],
        }
    )
    assert protect(split, {dlp.CARD: dlp.REDACT}).blocked == dlp.CARD
    assert protect(split, {dlp.CARD: dlp.PRIVATE}).private == dlp.CARD
