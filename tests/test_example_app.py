"""The example app, served by a real uvicorn with the process backend."""

from __future__ import annotations

from fastapi.testclient import TestClient

from example_app.main import app


def test_primes_run_on_a_runner_with_live_progress() -> None:
    with TestClient(app) as client:
        result = client.get("/primes", params={"n": 100_000}).json()
        assert result["primes"] == 9592 and result["runner"].startswith("primes-")
        with client.websocket_connect("/ws/primes") as ws:
            ws.send_text("200000")
            messages = []
            while True:
                message = ws.receive_json()
                messages.append(message)
                if "result" in message:
                    break
        progress = [m["progress"] for m in messages if "progress" in m]
        assert progress == sorted(progress) and progress
        assert messages[-1]["result"]["primes"] == 17984
        assert client.get("/stats").json()["runners"][0]["id"] == result["runner"]
        assert "Count primes" in client.get("/").text
