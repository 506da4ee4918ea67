"""Credentials that name no project (Colab's case), against the GCS emulator.

`google.colab.auth.authenticate_user()` leaves Application Default Credentials
that name no project. google-auth pins an `authorized_user` file's token URL to
Google, so the stand-in is a service-account key without `project_id` whose
`token_uri` is an OAuth token endpoint on 127.0.0.1 (a real RSA key: google-auth
signs the JWT grant it sends there). The
clients reach the emulator through their ordinary endpoint settings
(`API_ENDPOINT_OVERRIDE` for google-cloud-storage, fsspec's
`FSSPEC_GS_ENDPOINT_URL` for gcsfs) rather than `STORAGE_EMULATOR_HOST`, which
would switch both libraries to anonymous, project-less emulator mode and hide
the difference.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import threading
from typing import Iterator


class _TokenHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode()
        self.server.requests.append(body)
        if (
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer"
            not in body
        ):
            self.send_response(400)
            self.end_headers()
            return
        data = json.dumps(
            {"access_token": "ya29.test", "expires_in": 3600, "token_type": "Bearer"}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def login_without_project(directory: str, emulator_url: str) -> Iterator[dict]:
    """Yields the environment of a process logged in as a user with no project.

    Args:
      directory: where the credentials file and an empty gcloud config go.
      emulator_url: the GCS emulator's base URL (http://127.0.0.1:PORT).

    Yields:
      {"env": a full environment (os.environ less every project and emulator
      setting, plus the login), "server": the token endpoint, whose
      `requests` lists the token requests it answered}.
    """
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TokenHandler)
    server.requests = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    adc = os.path.join(directory, "key-without-project.json")
    with open(adc, "w", encoding="utf-8") as f:
        json.dump(
            {  # No "project_id": these credentials name no project.
                "type": "service_account",
                "client_email": "runner@example.iam.gserviceaccount.com",
                "client_id": "1",
                "private_key_id": "1",
                "private_key": pem,
                "token_uri": f"http://127.0.0.1:{server.server_port}/token",
            },
            f,
        )
    gcloud_config = os.path.join(directory, "gcloud")
    os.makedirs(gcloud_config, exist_ok=True)
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "STORAGE_EMULATOR_HOST",
            "GOOGLE_CLOUD_PROJECT",
            "GCLOUD_PROJECT",
            "CLOUDSDK_CORE_PROJECT",
        )
    }
    env.update(
        GOOGLE_APPLICATION_CREDENTIALS=adc,
        CLOUDSDK_CONFIG=gcloud_config,  # No `gcloud config set project` either.
        NO_GCE_CHECK="True",  # Not a GCE VM: don't probe a metadata server.
        API_ENDPOINT_OVERRIDE=emulator_url,
        FSSPEC_GS_ENDPOINT_URL=emulator_url,
        GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
    )
    try:
        yield {"env": env, "server": server}
    finally:
        server.shutdown()
        server.server_close()
