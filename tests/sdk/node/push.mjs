// Send one push the way a bot does, with the official Node SDK (@line/bot-sdk 11).
// Usage: node push.mjs MODE, MODE one of
//   node-proxy     default base URL (https://api.line.me), reaching the proxy only through
//                  HTTPS_PROXY + NODE_USE_ENV_PROXY=1 and trusting it through
//                  NODE_EXTRA_CA_CERTS (all set by the caller; needs Node >= 22.21 or 24.5)
//   node-base-url  MessagingApiClient({ baseURL: LRP_BASE_URL })
// Environment: LRP_TOKEN, LRP_TO, LRP_TEXT. Prints one JSON line like python_push.py:
//   {mode, status, sent_messages, request_id, retry_key, outcome}, exit 0; or
//   {mode, error, status}, exit 1 (2 for an unknown mode).
import { messagingApi } from "@line/bot-sdk";

const MODES = ["node-proxy", "node-base-url"];
const mode = process.argv[2] ?? "";

function describe(error) {
  // fetch hides the reason ("fetch failed") in error.cause, possibly nested.
  let text = `${error?.name}: ${error?.message}`;
  for (let cause = error?.cause, depth = 0; cause && depth < 4; cause = cause.cause, depth++) {
    text += ` (cause: ${cause.code ? cause.code + " " : ""}${cause.message ?? cause})`;
  }
  return text;
}

if (!MODES.includes(mode)) {
  console.log(JSON.stringify({ mode, error: `usage: push.mjs {${MODES.join("|")}}`, status: null }));
  process.exit(2);
}

const config = { channelAccessToken: process.env.LRP_TOKEN };
if (mode === "node-base-url") config.baseURL = process.env.LRP_BASE_URL;

try {
  const client = new messagingApi.MessagingApiClient(config);
  const answer = await client.pushMessageWithHttpInfo({
    to: process.env.LRP_TO,
    messages: [{ type: "text", text: process.env.LRP_TEXT }],
  });
  const headers = answer.httpResponse.headers;
  console.log(JSON.stringify({
    mode,
    status: answer.httpResponse.status,
    sent_messages: answer.body?.sentMessages ?? null,
    request_id: headers.get("x-line-request-id"),
    retry_key: headers.get("x-line-retry-key"),
    outcome: headers.get("x-line-retry-proxy"),
  }));
} catch (error) {
  // HTTPFetchError (non-2xx) carries the status.
  const status = Number.isInteger(error?.status) ? error.status : null;
  console.log(JSON.stringify({ mode, error: describe(error), status }));
  process.exit(1);
}
