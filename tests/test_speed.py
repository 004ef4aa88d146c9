"""Replicas, shards and prompts that a server's prefix cache can reuse (issue 7).
Throughput itself is measured by bench/throughput.py, not asserted here."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from conftest import make_dataset, run_caption, run_caption_process, write_config
from fake_servers import Fault, FakeDanbooru, FakeOpenAIServer, Text, user_text


def test_replicas_share_the_work(tmp_path, llm_server, danbooru, capsys):
    second = FakeOpenAIServer(models=["instruct-model"], delay=0.02).start()
    llm_server.delay = 0.02
    try:
        images = tmp_path / "images"
        make_dataset(images, {f"{n:02}.png": f"tag{n}" for n in range(40)})
        config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url,
                              tag_provider={"skip": True},
                              endpoints={"default": {"base_url": [llm_server.base_url, second.base_url],
                                                     "concurrency": 2}})
        code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
        assert code == 0 and "40 captioned" in out
        counts = (len(llm_server.chat_requests), len(second.chat_requests))
        assert sum(counts) == 40 and min(counts) >= 12, counts
        assert llm_server.max_in_flight <= 2 and second.max_in_flight <= 2
    finally:
        second.stop()


def test_a_failing_replica_is_rested_and_the_other_carries_on(tmp_path, llm_server, danbooru, capsys):
    broken = FakeOpenAIServer(models=["instruct-model"], responder=lambda request: Fault("drop")).start()
    try:
        images = tmp_path / "images"
        make_dataset(images, {f"{n:02}.png": f"tag{n}" for n in range(30)})
        config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url,
                              tag_provider={"skip": True},
                              endpoints={"default": {"base_url": [broken.base_url, llm_server.base_url],
                                                     "max_retries": 5, "retry_backoff": 0.01, "rest_after": 2,
                                                     "rest_seconds": 60}})
        code, out, err = run_caption([str(images), "--config", str(config)], capsys)
        assert code == 0 and "30 captioned" in out
        assert f"endpoint 'default' ({broken.base_url}) failed 2 times in a row" in err and "resting it" in err
        assert len(broken.chat_requests) <= 4 + 4  # the failures before it rested, at most one per slot
    finally:
        broken.stop()


def test_an_unreachable_replica_at_start_is_skipped(tmp_path, llm_server, danbooru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, tag_provider={"skip": True},
                          endpoints={"default": {"base_url": ["http://127.0.0.1:9/v1", llm_server.base_url]}})
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0 and "1 captioned" in out and "cannot reach endpoint 'default' (http://127.0.0.1:9/v1)" in err


def test_shards_split_the_folder_without_overlap(tmp_path, llm_server, danbooru, capsys):
    llm_server.responder = lambda request: Text("x" if "fail" in user_text(request) else "A caption.")
    images = tmp_path / "images"
    make_dataset(images, {f"{n:02}.png": f"tag{n}" for n in range(30)})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, tag_provider={"skip": True},
                          output={"extension": ".caption"})
    seen = []
    for shard in ("1/3", "2/3", "3/3"):
        before = len(llm_server.chat_requests)
        code, out, _ = run_caption([str(images), "--config", str(config), "--shard", shard], capsys)
        assert code == 0
        prompts = [user_text(r) for r in llm_server.chat_requests[before:]]
        seen.append({tag for tag in (f"tag{n}" for n in range(30)) if any(f"\n{tag}\n" in p + "\n" for p in prompts)})
    assert sum(len(part) for part in seen) == 30 and set().union(*seen) == {f"tag{n}" for n in range(30)}
    assert all(len(part) >= 4 for part in seen)
    code, _, err = run_caption([str(images), "--config", str(config), "--shard", "4/3"], capsys)
    assert code == 2 and "--shard takes K/N" in err


def test_shards_keep_their_own_failures_and_locks(tmp_path, llm_server, danbooru, capsys):
    llm_server.responder = lambda request: Text("")
    images = tmp_path / "images"
    make_dataset(images, {f"{n:02}.png": f"tag{n}" for n in range(10)})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, tag_provider={"skip": True},
                          output={"extension": ".caption"}, guards={"max_attempts": 1})
    run_caption([str(images), "--config", str(config), "--shard", "1/2"], capsys)
    run_caption([str(images), "--config", str(config), "--shard", "2/2"], capsys)
    first = [json.loads(line)["image"] for line in (images / "failures-1-of-2.jsonl").read_text().splitlines()]
    second = [json.loads(line)["image"] for line in (images / "failures-2-of-2.jsonl").read_text().splitlines()]
    assert len(first) + len(second) == 10 and not set(first) & set(second)
    assert (images / ".tagcaption" / "lock-1-of-2").exists() and (images / ".tagcaption" / "lock-2-of-2").exists()


def test_fixed_text_comes_first_for_prefix_caching(tmp_path, llm_server, vision_server, danbooru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat, outdoors", "b.png": "dog"})
    (tmp_path / "world.txt").write_text("A world of cats and dogs.")
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, tag_provider={"skip": True},
                          endpoints={"vision": {"base_url": vision_server.base_url}},
                          interrogator={"skip": False, "endpoint": "vision", "system_prompt": "Be factual.",
                                        "global_metadata_file": "world.txt", "hint_sources": ["full_path"]},
                          interpreter={"prompt_template": "templates/interpreter_prompt_template_short.txt"})
    code, _, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0
    first, second = vision_server.chat_requests
    assert first["messages"][0] == second["messages"][0] == {"role": "system",
                                                             "content": "Be factual.\n\nA world of cats and dogs."}
    texts = [r["messages"][1]["content"][0]["text"] for r in (first, second)]
    assert texts[0].split("File path:")[0] == texts[1].split("File path:")[0]
    prompts = [user_text(r) for r in llm_server.chat_requests]
    shared = prompts[0].split("Tags attached to the image:")[0]
    assert len(shared) > 300 and prompts[1].startswith(shared)


def make_certificate(folder) -> tuple:
    """A self-signed certificate for 127.0.0.1 and its key, made with the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def test_https_servers_are_verified_with_the_certificates_users_trust(tmp_path):
    """The LLM server and Danbooru over HTTPS share one TLS context, which honours SSL_CERT_FILE."""
    certificate = make_certificate(tmp_path / "trusted")
    llm = FakeOpenAIServer(models=["instruct-model"]).use_tls(*certificate).start()
    danbooru = FakeDanbooru(wiki={"cat": "A small [[feline]]."}).use_tls(*certificate).start()
    try:
        images = tmp_path / "images"
        make_dataset(images, {"a.png": "cat"})
        config = write_config(tmp_path / "config.yaml", llm.base_url, danbooru.url)
        args = [str(images), "--config", str(config), "--no-progress"]
        result = run_caption_process(args, SSL_CERT_FILE=str(certificate[0]))
        assert result.returncode == 0, result.stderr
        assert "1 captioned" in result.stdout
        assert [r.path for r in danbooru.requests] == ["/tags.json"]
        assert len(llm.chat_requests) == 2  # the tag summary and the caption

        (images / "a.txt").unlink()  # the caption goes; the tags stay in a.tags.txt, where they are read
        stranger = make_certificate(tmp_path / "stranger")[0]
        result = run_caption_process(args, SSL_CERT_FILE=str(stranger))
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "certificate verify failed" in result.stderr and "set SSL_CERT_FILE" in result.stderr, result.stderr

        empty = tmp_path / "empty.pem"
        empty.write_text("")
        result = run_caption_process(args, SSL_CERT_FILE=str(empty))
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert f"cannot load the TLS certificates from SSL_CERT_FILE={empty}" in result.stderr, result.stderr
        assert len(llm.chat_requests) == 2
    finally:
        llm.stop()
        danbooru.stop()


def test_a_broken_ssl_cert_file_does_not_matter_to_plain_http_servers(tmp_path, llm_server, danbooru):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, tag_provider={"skip": True})
    result = run_caption_process([str(images), "--config", str(config), "--no-progress"],
                                 SSL_CERT_FILE=str(tmp_path / "gone.pem"))
    assert result.returncode == 0, result.stderr
    assert "1 captioned" in result.stdout
