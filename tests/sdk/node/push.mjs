// Send one push the way a bot does, with the official Node SDK.
// Usage: node push.mjs MODE, MODE one of
//   node-proxy     default base URL (https://api.line.me), reaching the proxy only through
//                  HTTPS_PROXY + NODE_USE_ENV_PROXY=1, trusting it through NODE_EXTRA_CA_CERTS
//   node-base-url  baseURL = LRP_BASE_URL
// Environment: LRP_TOKEN, LRP_TO, LRP_TEXT. Prints one JSON line like python_push.py.
import { messagingApi } from "@line/bot-sdk";

const mode = process.argv[2];
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
    sent_messages: answer.body.sentMessages,
    request_id: headers.get("x-line-request-id"),
    retry_key: headers.get("x-line-retry-key"),
    outcome: headers.get("x-line-retry-proxy"),
  }));
} catch (error) {
  console.log(JSON.stringify({ mode, error: `${error.name}: ${error.message}` }));
  process.exit(1);
}
