-- End a sale: early by its host, or because its time is up. Orders already
-- reserved may still be paid until their pay-by time.
-- Times in milliseconds, from the Redis server's clock (the now_ms.lua prelude).
-- KEYS[1]  sale hash
-- KEYS[2]  log stream
-- ARGV[1]  reason: 'host' (now) or 'time' (only once ends_at has passed)
-- Returns 1 if this call ended the sale, 0 if it had ended already or is not due
local sale, log = KEYS[1], KEYS[2]
local reason = ARGV[1]

local now = now_ms()

local s = redis.call('HMGET', sale, 'ended_at', 'ends_at')
if not s[1] or tonumber(s[1]) > 0 then
  return 0
end
local ended_at = now
if reason == 'time' then
  if now < tonumber(s[2]) then
    return 0
  end
  ended_at = tonumber(s[2])
end
redis.call('HSET', sale, 'ended_at', ended_at, 'end_reason', reason)
redis.call('HINCRBY', sale, 'v', 1)
redis.call('XADD', log, '*', 'sale_ended', cjson.encode({ended_at = ended_at, reason = reason}))
return 1
