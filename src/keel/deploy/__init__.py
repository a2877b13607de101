"""Gated deployment of registry versions: validation, canary routing, promote or rollback.

An approval in the registry starts a deployment (:mod:`keel.deploy.service`);
the monitor (:mod:`keel.deploy.monitor`, one replica at a time) validates the
version with the model's eval suite against ``name@VERSION``, puts it on a
canary share of the gateway alias, compares it with production over a window
(:mod:`keel.deploy.compare`) and promotes or rolls it back, telling the alert
channels. Routes live in the store (:mod:`keel.deploy.store`) and every gateway
process follows them (:mod:`keel.deploy.serving`).
"""
