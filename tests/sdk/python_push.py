"""Send one push the way a bot does, with the official Python SDK.

Usage: python_push.py MODE, MODE one of
  legacy-proxy     linebot.LineBotApi, default endpoint, reaching the proxy only through
                   HTTPS_PROXY and trusting it through REQUESTS_CA_BUNDLE (set by the caller)
  legacy-base-url  LineBotApi(token, endpoint=LRP_BASE_URL)
  v3-proxy         linebot.v3 client with Configuration.proxy = LRP_PROXY_URL and
                   Configuration.ssl_ca_cert = LRP_CA_FILE (it ignores HTTPS_PROXY)
  v3-base-url      linebot.v3 client with Configuration(host=LRP_BASE_URL)
Environment: LRP_TOKEN (channel access token), LRP_TO (user id), LRP_TEXT (message).
Prints one JSON line: mode, status, sent_messages, request_id, retry_key, outcome.
"""
import json
import os
import sys


def header(headers, name):
    for key, value in (headers or {}).items():
        if key.lower() == name:
            return value
    return None


def legacy(mode):
    from linebot import LineBotApi
    from linebot.http_client import RequestsHttpClient
    from linebot.models import TextSendMessage

    class Recording(RequestsHttpClient):
        """The SDK's own requests client; keeps the last answer, which push_message drops."""

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
    return {
        "status": response.status_code,
        "sent_messages": response.json.get("sentMessages"),
        "request_id": header(response.headers, "x-line-request-id"),
        "retry_key": header(response.headers, "x-line-retry-key"),
        "outcome": header(response.headers, "x-line-retry-proxy"),
    }


def v3(mode):
    from linebot.v3.messaging import ApiClient, Configuration, MessagingApi, PushMessageRequest, TextMessage

    token = os.environ["LRP_TOKEN"]
    if mode == "v3-base-url":
        configuration = Configuration(host=os.environ["LRP_BASE_URL"], access_token=token)
    else:
        # As the README shows it: the CA through the constructor, the proxy as an attribute.
        configuration = Configuration(access_token=token, ssl_ca_cert=os.environ["LRP_CA_FILE"])
        configuration.proxy = os.environ["LRP_PROXY_URL"]
    with ApiClient(configuration) as client:
        request = PushMessageRequest(to=os.environ["LRP_TO"], messages=[TextMessage(text=os.environ["LRP_TEXT"])])
        answer = MessagingApi(client).push_message_with_http_info(request)
    sent = [{"id": m.id, "quoteToken": m.quote_token} for m in answer.data.sent_messages]
    return {
        "status": answer.status_code,
        "sent_messages": sent,
        "request_id": header(answer.headers, "x-line-request-id"),
        "retry_key": header(answer.headers, "x-line-retry-key"),
        "outcome": header(answer.headers, "x-line-retry-proxy"),
    }


def main():
    mode = sys.argv[1]
    try:
        result = legacy(mode) if mode.startswith("legacy-") else v3(mode)
    except Exception as error:  # the caller reads the type and message
        print(json.dumps({"mode": mode, "error": f"{type(error).__name__}: {error}"}))
        return 1
    print(json.dumps({"mode": mode, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
