-- wrk script: POST a ~300-byte push with a channel token, as a bot does.
-- Arguments after `--`: NONCE [unique|same]
--   unique (default): every request body is distinct (new fingerprint, new retry key),
--                     also across threads, rounds and runs (the nonce);
--   same:             one body for the whole run (after the first, answers are replayed).
-- done() prints one line "BENCH {json}" for bench/harness.py.

local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

local nonce, same, fixed = "0", false, nil
local seq = 0
local headers = {
  ["Authorization"] = "Bearer bench-channel-access-token",
  ["Content-Type"] = "application/json",
}

local function body(t, n)
  return string.format(
    '{"to":"U%016x%016x","messages":[{"type":"text","text":"Your order %s-%d-%d has shipped. '
      .. 'Track it in the app; reply STOP to opt out of delivery updates. Thank you for '
      .. 'shopping with us, and have a good day!"}]}',
    t, n, nonce, t, n)
end

function init(args)
  nonce = args[1] or "0"
  same = args[2] == "same"
  if same then
    fixed = wrk.format("POST", wrk.path, headers, body(0, 0))
  end
end

function request()
  if fixed then return fixed end
  seq = seq + 1
  return wrk.format("POST", wrk.path, headers, body(tid, seq))
end

function done(summary, latency, requests)
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"non_2xx":%d,"errors":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
