"""E-mail over SMTP (stdlib smtplib in a worker thread): one message per group.

Plain SMTP, STARTTLS (``starttls: true``, the default) or implicit TLS
(``ssl: true``, port 465); login when ``username`` is set, with the password
from the environment variable ``password_env``. Certificates are verified.
"""

from __future__ import annotations

import asyncio
import html
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from keel.alerts import messages as m
from keel.alerts.model import DeliveryError, Notification
from keel.alerts.notifiers.base import Notifier, register_notifier

_COLORS = {"critical": "#c62828", "warning": "#ef6c00", "info": "#1565c0"}


def text_body(notifications: list[Notification]) -> str:
    ns = m.ordered(notifications)
    parts = [m.group_subject(ns).removeprefix("[Keel] "), ""]
    if len(ns) > 1:
        parts += [f"  - {m.summary(n)}" for n in ns] + [""]
    sep = "\n\n" + "-" * 60 + "\n\n"
    parts.append(sep.join(m.details(n) for n in ns))
    parts += [
        "",
        "--",
        "Sent by Keel alerts. Configure channels under alerts.channels in keel.yaml.",
    ]
    return "\n".join(parts)


def _html_alert(n: Notification) -> str:
    color = "#2e7d32" if n.kind == "resolved" else _COLORS.get(n.severity, "#ef6c00")
    if n.kind == "test":
        color = "#6a1b9a"
    rows = []
    for key, val in m.facts(n):
        if val.startswith(("http://", "https://")):
            cell = f'<a href="{html.escape(val)}">{html.escape(val)}</a>'
        else:
            cell = html.escape(val).replace("\n", "<br>")
        rows.append(
            f'<tr><th align="left" valign="top" style="padding:2px 12px 2px 0">'
            f"{html.escape(key)}</th><td>{cell}</td></tr>"
        )
    return (
        f'<div style="border-left:4px solid {color};padding:4px 12px;margin:12px 0">'
        f'<h3 style="margin:4px 0;color:{color}">{html.escape(m.status_emoji(n))} '
        f"{html.escape(m.title(n))}</h3>"
        f"<p>{html.escape(m.summary(n))}</p>"
        f'<table style="border-collapse:collapse">{"".join(rows)}</table></div>'
    )


def html_body(notifications: list[Notification]) -> str:
    ns = m.ordered(notifications)
    return (
        '<!doctype html><html><body style="font-family:sans-serif">'
        f"<h2>{html.escape(m.group_subject(ns).removeprefix('[Keel] '))}</h2>"
        + "".join(_html_alert(n) for n in ns)
        + '<p style="color:#777">Sent by Keel alerts.</p></body></html>'
    )


def build_email(notifications: list[Notification], sender: str, to: list[str]) -> EmailMessage:
    msg = EmailMessage()
    msg["Subject"] = m.group_subject(notifications)
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    msg["Date"] = formatdate(usegmt=True)
    # make_msgid() without a domain looks up the FQDN, which can stall on DNS.
    msg["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or "keel.local")
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(text_body(notifications))
    msg.add_alternative(html_body(notifications), subtype="html")
    return msg


@register_notifier
class EmailNotifier(Notifier):
    kind = "email"

    async def send(self, notifications: list[Notification]) -> None:
        s = self.settings
        if not (s.smtp_host and s.sender and s.to):
            raise DeliveryError(
                f"channel '{self.name}' needs smtp_host, sender and to", retryable=False
            )
        password = None
        if s.username:
            if not s.password_env:
                raise DeliveryError(
                    f"channel '{self.name}' sets username but no password_env", retryable=False
                )
            password = self.env(s.password_env, "SMTP password")
        msg = build_email(notifications, s.sender, list(s.to))
        try:
            await asyncio.to_thread(self._send_sync, msg, password)
        except DeliveryError:
            raise
        except Exception as e:
            raise self._classify(e) from e

    def _send_sync(self, msg: EmailMessage, password: str | None) -> None:
        s = self.settings
        assert s.smtp_host is not None
        context = ssl.create_default_context()
        smtp: smtplib.SMTP
        if s.ssl:
            smtp = smtplib.SMTP_SSL(s.smtp_host, s.smtp_port, timeout=s.timeout_s, context=context)
        else:
            smtp = smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=s.timeout_s)
        with smtp:
            smtp.ehlo()
            if s.starttls:
                smtp.starttls(context=context)
                smtp.ehlo()
            if s.username:
                smtp.login(s.username, password or "")
            refused = smtp.send_message(msg)
        if refused:
            # Delivered to the others: not retryable, or they would get it twice.
            raise DeliveryError(
                "the SMTP server refused "
                + ", ".join(f"{rcpt} ({code})" for rcpt, (code, _) in refused.items()),
                retryable=False,
            )

    def _classify(self, e: BaseException) -> DeliveryError:
        s = self.settings
        where = f"{s.smtp_host}:{s.smtp_port}"
        if isinstance(e, smtplib.SMTPAuthenticationError):
            return DeliveryError(
                self.scrub(
                    f"{where} refused the login of {s.username}: {e.smtp_code} "
                    f"{_text(e.smtp_error)}"
                ),
                retryable=False,
            )
        if isinstance(e, smtplib.SMTPNotSupportedError):
            return DeliveryError(
                f"{where} does not support what the channel asks for: {e} "
                "(check starttls/ssl/username)",
                retryable=False,
            )
        if isinstance(e, smtplib.SMTPRecipientsRefused):
            return DeliveryError(
                f"{where} refused every recipient: "
                + ", ".join(f"{r} ({c} {_text(t)})" for r, (c, t) in e.recipients.items()),
                retryable=False,
            )
        if isinstance(e, smtplib.SMTPResponseException):
            # 4xx is "try again later" in SMTP, 5xx is permanent.
            return DeliveryError(
                self.scrub(f"{where} answered {e.smtp_code} {_text(e.smtp_error)}"),
                retryable=400 <= e.smtp_code < 500,
            )
        if isinstance(e, ssl.SSLCertVerificationError):
            return DeliveryError(
                f"TLS certificate of {where} did not verify: {e.verify_message}", retryable=False
            )
        if isinstance(e, TimeoutError):
            return DeliveryError(f"{where} did not answer within {s.timeout_s:g} s")
        if isinstance(e, smtplib.SMTPException | OSError):
            return DeliveryError(
                self.scrub(f"could not deliver to {where}: {type(e).__name__}: {e}")
            )
        return DeliveryError(
            self.scrub(f"e-mail to {where} failed: {type(e).__name__}: {e}"), retryable=False
        )


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
