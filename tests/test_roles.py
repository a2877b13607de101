"""Splitting the roles: `keel up --role gateway` serves calls, `keel worker` runs the jobs."""

from __future__ import annotations

import httpx
import pytest

from conftest import KeelServer, make_settings
from keel.app import create_app
from keel.errors import ConfigError


def test_gateway_and_worker_split_the_work(fake, tmp_path):
    settings = make_settings(fake, tmp_path / "shared", local={"enabled": True})
    gw = KeelServer(settings)
    gw.app = create_app(settings, environ={"FAKE_KEY": "k"}, roles=("gateway",))
    gw.server.config.app = gw.app
    wk = KeelServer(settings)
    wk.app = create_app(settings, environ={"FAKE_KEY": "k"}, roles=("daemons",))
    wk.server.config.app = wk.app
    gw.start()
    wk.start()
    try:
        gw_daemons = {d.name for d in gw.app.state.keel.daemons}
        wk_daemons = {d.name for d in wk.app.state.keel.daemons}
        # every gateway process follows the deployment routes; the singletons run in the worker
        assert gw_daemons == {"resource-sampler", "route-sync"}
        assert {"alerts", "probes", "retention", "resource-sampler", "deploy"} <= wk_daemons
        assert "route-sync" not in wk_daemons
        body = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(gw.url + "/v1/chat/completions", json=body).status_code == 200
        assert httpx.post(wk.url + "/v1/chat/completions", json=body).status_code == 404
        # both read the same store through the API
        gw.flush()
        assert len(httpx.get(wk.url + "/api/traces").json()["data"]) == 1
        assert httpx.get(wk.url + "/metrics").status_code == 200
        # the worker does not load the embedded model the gateways serve
        assert all(
            p.kind != "local" or not p.available for p in wk.app.state.keel.providers.values()
        )
    finally:
        gw.stop()
        wk.stop()


def test_unknown_role_is_refused(fake, tmp_path):
    with pytest.raises(ConfigError, match="roles must be among"):
        create_app(make_settings(fake, tmp_path), roles=("cron",))
