"""Send one push the way a bot does, with the official Python SDK (line-bot-sdk 3.x).

Usage: python_push.py MODE, MODE one of
  legacy-proxy     linebot.LineBotApi with its default endpoint (https://api.line.me),
                   reaching the proxy only through HTTPS_PROXY and trusting it through
                   REQUESTS_CA_BUNDLE (both set by the caller; requests reads them)
  legacy-base-url  LineBotApi(token, endpoint=LRP_BASE_URL)
  v3-proxy         linebot.v3.messaging sync client, default host, with
                   Configuration.proxy = LRP_PROXY_URL and Configuration.ssl_ca_cert =
                   LRP_CA_FILE (its urllib3 client ignores HTTPS_PROXY)
  v3-base-url      linebot.v3.messaging with Configuration(host=LRP_BASE_URL)
  v3-stateless-proxy, v3-stateless-base-url
                   as v3-proxy / v3-base-url, but the token is first issued with the SDK's
                   own ChannelAccessToken API (a stateless token, POST /oauth2/v3/token)
                   through the same proxy, from LRP_CHANNEL_ID and LRP_CHANNEL_SECRET, as a
                   bot that refreshes its token does; the push then uses that token
  tunnel           a plain requests.post of the push to LRP_TUNNEL_URL, another host a
                   bot talks to through the same HTTPS_PROXY (api-data.line.me, say),
                   which the proxy tunnels untouched; REQUESTS_CA_BUNDLE decides trust
Environment: LRP_TOKEN (channel access token), LRP_TO (user id), LRP_TEXT (message text).

Prints exactly one JSON line on stdout:
  {"mode", "status", "sent_messages": [{"id", "quoteToken"}], "request_id", "retry_key", "outcome"}
(the last three are the x-line-request-id, x-line-retry-key and x-line-retry-proxy
response headers, null when absent) and exits 0; on any error it prints
  {"mode", "error": "<type>: <message>", "status": <HTTP status or null>}
and exits 1 (2 for an unknown mode).
"""
import json
import os
import sys
import warnings

MODES = (
    "legacy-proxy",
    "legacy-base-url",
    "v3-proxy",
    "v3-base-url",
    "v3-stateless-proxy",
    "v3-stateless-base-url",
    "tunnel",
)


def header(headers, name):
    for key, value in (headers or {}).items():
        if key.lower() == name:
            return value
    return None


def result(status, sent_messages, headers):
    return {
        "status": status,
        "sent_messages": sent_messages,
        "request_id": header(headers, "x-line-request-id"),
        "retry_key": header(headers, "x-line-retry-key"),
        "outcome": header(headers, "x-line-retry-proxy"),
    }


def legacy(mode):
    from linebot import LineBotApi
    from linebot.deprecations import LineBotSdkDeprecatedIn30
    from linebot.http_client import RequestsHttpClient
    from linebot.models import TextSendMessage

    # Every legacy call warns on stderr that it is deprecated; real bots still use it.
    warnings.simplefilter("ignore", LineBotSdkDeprecatedIn30)

    class Recording(RequestsHttpClient):
        """The SDK's own requests client, unchanged, keeping the last answer:
        LineBotApi.push_message returns None, so this is the only way to its headers."""

        last = None

        def post(self, url, headers=None, data=None, timeout=None):
            response = super().post(url, headers=headers, data=data, timeout=timeout)
            Recording.last = response
            return response

    kwargs = {"http_client": Recording}
    if mode == "legacy-base-url":
        kwargs["endpoint"] = os.environ["LRP_BASE_URL"]
    api = LineBotApi(os.environ["LRP_TOKEN"], **kwargs)
    api.push_message(os.environ["LRP_TO"], TextSendMessage(text=os.environ["LRP_TEXT"]))
    response = Recording.last
    return result(response.status_code, response.json.get("sentMessages"), response.headers)


def v3(mode):
    from linebot.v3.messaging import (
        ApiClient,
        Configuration,
        MessagingApi,
        PushMessageRequest,
        TextMessage,
    )

    token = stateless_token(mode) if "stateless" in mode else os.environ["LRP_TOKEN"]
    if mode.endswith("base-url"):
        configuration = Configuration(host=os.environ["LRP_BASE_URL"], access_token=token)
    else:
        # The v3 client ignores HTTPS_PROXY. Written as the README shows it: the CA
        # through the constructor, the proxy as an attribute (there is no such argument).
        configuration = Configuration(access_token=token, ssl_ca_cert=os.environ["LRP_CA_FILE"])
        configuration.proxy = os.environ["LRP_PROXY_URL"]
    request = PushMessageRequest(
        to=os.environ["LRP_TO"], messages=[TextMessage(text=os.environ["LRP_TEXT"])]
    )
    with ApiClient(configuration) as client:
        answer = MessagingApi(client).push_message_with_http_info(request)
    sent = [{"id": m.id, "quoteToken": m.quote_token} for m in answer.data.sent_messages]
    return result(answer.status_code, sent, answer.headers)


def stateless_token(mode):
    """A stateless token issued with the SDK's oauth client, reaching LINE as the push
    does: through the proxy's base URL, or through it as an HTTPS proxy."""
    from linebot.v3.oauth import ApiClient, ChannelAccessToken, Configuration

    if mode.endswith("base-url"):
        configuration = Configuration(host=os.environ["LRP_BASE_URL"])
    else:
        configuration = Configuration(ssl_ca_cert=os.environ["LRP_CA_FILE"])
        configuration.proxy = os.environ["LRP_PROXY_URL"]
    with ApiClient(configuration) as client:
        issued = ChannelAccessToken(client).issue_stateless_channel_token_by_client_secret(
            os.environ["LRP_CHANNEL_ID"], os.environ["LRP_CHANNEL_SECRET"]
        )
    return issued.access_token


def tunnel():
    import requests

    response = requests.post(
        os.environ["LRP_TUNNEL_URL"],
        headers={"Authorization": "Bearer " + os.environ["LRP_TOKEN"]},
        json={"to": os.environ["LRP_TO"], "messages": [{"type": "text", "text": os.environ["LRP_TEXT"]}]},
        timeout=30,
    )
    return result(response.status_code, response.json().get("sentMessages"), response.headers)


def error_status(error):
    # LineBotApiError.status_code (legacy), ApiException.status (v3)
    for name in ("status_code", "status"):
        value = getattr(error, name, None)
        if isinstance(value, int):
            return value
    return None


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode not in MODES:
        print(json.dumps({"mode": mode, "error": f"usage: python_push.py {{{'|'.join(MODES)}}}", "status": None}))
        return 2
    try:
        if mode == "tunnel":
            answer = tunnel()
        elif mode.startswith("legacy-"):
            answer = legacy(mode)
        else:
            answer = v3(mode)
    except Exception as error:  # the caller reads the type and message
        print(json.dumps({"mode": mode, "error": f"{type(error).__name__}: {error}", "status": error_status(error)}))
        return 1
    print(json.dumps({"mode": mode, **answer}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
