"""Push the dashboard to a Grafana server with grafana-client: create or overwrite, by uid.

Pushing twice leaves one dashboard (same uid, `overwrite`); a folder is found by title or made.
Every failure is a `GrafanaPushError` whose message says what to fix (URL, token, folder).
"""

from __future__ import annotations

from pagedserve.cluster.grafana_dashboard import dashboard

TIMEOUT_S = 10.0


class GrafanaPushError(RuntimeError):
    """The push failed; the message is meant for the user."""


def push_dashboard(url: str, token: str, folder: str | None = None) -> dict:
    """Create or overwrite the pagedserve dashboard; returns Grafana's answer (uid, url, ...)."""
    try:
        from grafana_client import GrafanaApi
        from grafana_client.client import GrafanaException, GrafanaUnauthorizedError
        from niquests.exceptions import RequestException
    except ImportError as err:
        raise GrafanaPushError("pushing needs grafana-client: pip install "
                               "'pagedserve[grafana]'") from err
    if not url.startswith(("http://", "https://")):
        raise GrafanaPushError(f"--url must start with http:// or https://, got {url!r}")
    api = GrafanaApi.from_url(url, credential=token, timeout=TIMEOUT_S)
    try:
        body = {"dashboard": {**dashboard(), "id": None}, "overwrite": True,
                "message": "pagedserve grafana"}
        if folder:
            body["folderUid"] = _folder_uid(api, folder)
        return api.dashboard.update_dashboard(body)
    except GrafanaUnauthorizedError as err:
        raise GrafanaPushError(f"Grafana at {url} rejected the token (HTTP 401): use a "
                               "service-account token with the Editor role") from err
    except GrafanaException as err:
        raise GrafanaPushError(f"Grafana at {url} refused the dashboard: {err}") from err
    except RequestException as err:
        raise GrafanaPushError(f"cannot reach Grafana at {url}: {err}") from err


def _folder_uid(api, title: str) -> str:
    for found in api.folder.get_all_folders():
        if found.get("title") == title:
            return found["uid"]
    return api.folder.create_folder(title)["uid"]
