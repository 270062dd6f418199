-- Spend from one rate-limit bucket (GCRA, see the gcra.lua prelude loaded in front of this).
-- Times in milliseconds, from the Redis server's clock so every app process agrees.
-- KEYS[1]  the bucket
-- ARGV[1]  emission interval: ms per unit (1000 / rate per second)
-- ARGV[2]  burst: units that may be spent at once
-- ARGV[3]  cost of this request, in units
-- ARGV[4]  '1': only check (spend nothing); else spend when allowed
-- Returns {allowed (1|0), retry_after_ms}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local new_tat, wait = gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), now)
if wait > 0 then
  return {0, wait}
end
if ARGV[4] ~= '1' then
  gcra_spend(KEYS[1], new_tat, now)
end
return {1, 0}
