-- Rate limit by GCRA (a token bucket kept as one timestamp). Times in milliseconds,
-- taken from the Redis server's clock so every app process agrees.
-- KEYS[1]  the bucket (its "theoretical arrival time", ms)
-- ARGV[1]  emission interval: ms per unit (1000 / rate per second)
-- ARGV[2]  burst: units that may be spent at once
-- ARGV[3]  cost of this request, in units
-- Returns {allowed (1|0), retry_after_ms}
local bucket = KEYS[1]
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local tat = tonumber(redis.call('GET', bucket)) or now
if tat < now then tat = now end
local new_tat = tat + interval * cost
local allow_at = new_tat - interval * burst
if now < allow_at then
  return {0, allow_at - now}
end
redis.call('SET', bucket, new_tat, 'PX', math.max(1, new_tat - now))
return {1, 0}
