//! The Lua scripts: each step that must be atomic across replicas, in one round trip.

/// Answer, lease, sighting: checked, taken, read or recorded in one step.
/// KEYS: answer, lease, sighting. ARGV: now (ms since the epoch, the proxy's clock),
/// window (ms), lease (ms), owner token, `1` if the window is under 24 h.
/// Returns {1, record} to replay, {2, ''} to wait, {3, first seen} to own the send.
pub(super) const CLAIM: &str = r"
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local function inside(seen)
  return seen ~= nil and math.max(now - seen, 0) < window
end
local kept = redis.call('GET', KEYS[1])
if kept then
  if inside(tonumber(string.match(kept, '^(%d+):'))) then
    return {1, kept}
  end
  -- kept under a longer window than the one in force, or unreadable
  redis.call('DEL', KEYS[1])
end
if not redis.call('SET', KEYS[2], ARGV[4], 'NX', 'PX', ARGV[3]) then
  return {2, ''}
end
local first = ARGV[1]
if ARGV[5] == '1' then
  local seen = redis.call('GET', KEYS[3])
  if seen and inside(tonumber(seen)) then
    first = seen
  else
    redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
  end
end
return {3, first}
";

/// Keep (when a lifetime is given), release the lease if still ours, tell every waiter.
/// KEYS: answer, lease. ARGV: owner token, record, keep for (ms, 0: not kept),
/// channel, fingerprint (the message is the fingerprint, then the record).
pub(super) const PUBLISH: &str = r"
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
end
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
end
redis.call('PUBLISH', ARGV[4], ARGV[5] .. ARGV[2])
return 1
";

/// Deletes a key only if it still holds the value given (a lease still ours, a record
/// not replaced meanwhile). KEYS: the key. ARGV: the value, a channel ('' for none),
/// the message.
pub(super) const DELETE_IF_HELD: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if ARGV[2] ~= '' then
    redis.call('PUBLISH', ARGV[2], ARGV[3])
  end
end
return 1
";
