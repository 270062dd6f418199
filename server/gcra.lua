-- GCRA rate limiting: a token bucket kept as one timestamp per bucket, its "theoretical
-- arrival time" in ms. A prelude: scripts that rate-limit are loaded with this text in front
-- (server/backends/lua.py), so every limit in the product is the same arithmetic.
-- gcra(bucket, interval_ms, burst, cost, now_ms) -> new_tat, wait_ms
--   wait_ms > 0: refused, retry in wait_ms. Else allowed: nothing is written until the caller
--   spends with gcra_spend(bucket, new_tat, now_ms), once all its checks have passed.
local function gcra(bucket, interval, burst, cost, now)
  local tat = tonumber(redis.call('GET', bucket)) or now
  if tat < now then tat = now end
  local new_tat = tat + interval * cost
  local allow_at = new_tat - interval * burst
  if now < allow_at then
    return new_tat, math.ceil(allow_at - now)
  end
  return new_tat, 0
end

local function gcra_spend(bucket, new_tat, now)
  redis.call('SET', bucket, new_tat, 'PX', math.max(1, math.ceil(new_tat - now)))
end
