-- Spend from one rate-limit bucket (GCRA, see the gcra.lua prelude loaded in front of this).
-- Times in milliseconds, from the Redis server's clock so every app process agrees. Loaded after
-- the now_ms.lua and gcra.lua preludes.
-- KEYS[1]  the bucket
-- ARGV[1]  emission interval: ms per unit (1000 / rate per second)
-- ARGV[2]  burst: units that may be spent at once
-- ARGV[3]  cost of this request, in units
-- ARGV[4]  'refund': give `cost` units back (an attempt that turned out not to count); else spend
-- Returns {allowed (1|0), retry_after_ms}
local now = now_ms()

if ARGV[4] == 'refund' then
  local tat = tonumber(redis.call('GET', KEYS[1]))
  if tat then
    tat = tat - tonumber(ARGV[1]) * tonumber(ARGV[3])
    if tat > now then
      redis.call('SET', KEYS[1], tat, 'PX', math.ceil(tat - now))
    else
      redis.call('DEL', KEYS[1])
    end
  end
  return {1, 0}
end

local new_tat, wait = gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), now)
if wait > 0 then
  return {0, wait}
end
gcra_spend(KEYS[1], new_tat, now)
return {1, 0}
