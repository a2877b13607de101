"""Alerts: rules over signals, a persisted state machine, notifications."""
