-- Reserve flash-sale stock for a buyer: the one atomic step of a purchase, and its only
-- Redis round trip (the buyer's rate limits are checked here too).
-- Every check comes before the first write, so a refusal changes nothing (but a rate-limit
-- bucket, once the rate limits let the attempt through). The idempotency check comes before
-- all but the sale's existence, so a retried call (redis-py retries after a timeout or a
-- dropped connection; buyers retry with the same key) returns the order it already made,
-- without spending from the rate limits.
-- Times in milliseconds, from the Redis server's clock. Loaded after the now_ms.lua and gcra.lua
-- preludes.
-- KEYS[1]  sale hash: stock, remaining, reserved, paid, limit, starts_at, ends_at, ended_at, timeout_ms, price, v
-- KEYS[2]  buyers hash: user id -> units held (reserved + paid)
-- KEYS[3]  idempotency hash: '<user id>:<key>' -> order id
-- KEYS[4]  orders hash: order id -> order record (JSON)
-- KEYS[5]  expiry sorted set: order id -> pay-by time
-- KEYS[6]  log stream, read by the persister
-- KEYS[7..] rate-limit buckets (may be none), each with two ARGV from ARGV[6] on: interval ms, burst
-- ARGV[1]  buyer's user id
-- ARGV[2]  Idempotency-Key
-- ARGV[3]  id for the new order
-- ARGV[4]  quantity
-- ARGV[5]  referrer's user id, or ''
-- Returns {status, order JSON or '', remaining, v (the sale's version), retry_after_ms}; status is one of
--   'reserved', 'duplicate' (the key was used: its order is returned), 'key_reused' (same key,
--   other quantity), 'no_sale', 'rate_limited', 'not_started', 'ended', 'limit_exceeded', 'sold_out',
--   'not_enough'
local sale, buyers, idem, orders, expiry, log = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local user, key, order_id, qty, ref = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]

local now = now_ms()

local s = redis.call('HMGET', sale, 'remaining', 'limit', 'starts_at', 'ends_at', 'ended_at', 'timeout_ms', 'price',
                    'reserved', 'v')
if not s[1] then
  return {'no_sale', '', 0}
end
local remaining, limit = tonumber(s[1]), tonumber(s[2])

local idem_field = user .. ':' .. key
local existing = redis.call('HGET', idem, idem_field)
if existing then
  local record = redis.call('HGET', orders, existing)
  if cjson.decode(record).quantity ~= qty then
    return {'key_reused', record, remaining}
  end
  return {'duplicate', record, remaining}
end

-- Every bucket is checked before any is spent: a refusal by one costs nothing from the others.
local spend = {}
for i = 7, #KEYS do
  local a = 6 + (i - 7) * 2
  local new_tat, wait = gcra(KEYS[i], tonumber(ARGV[a]), tonumber(ARGV[a + 1]), 1, now)
  if wait > 0 then
    return {'rate_limited', '', remaining, 0, wait}
  end
  spend[#spend + 1] = {KEYS[i], new_tat}
end
for _, b in ipairs(spend) do
  gcra_spend(b[1], b[2], now)
end

local starts_at, ends_at, ended_at = tonumber(s[3]), tonumber(s[4]), tonumber(s[5])
local timeout_ms, price = tonumber(s[6]), tonumber(s[7])

if ended_at > 0 or now >= ends_at then
  return {'ended', '', remaining}
end
if now < starts_at then
  return {'not_started', '', remaining}
end
local held = tonumber(redis.call('HGET', buyers, user)) or 0
if held + qty > limit then
  return {'limit_exceeded', '', remaining}
end
if remaining == 0 then
  return {'sold_out', '', 0}
end
if remaining < qty then
  return {'not_enough', '', remaining}
end

-- All checks passed: from here on, only writes.
-- One HSET of the values read above (each redis.call costs more than the command itself).
remaining = remaining - qty
local v = tonumber(s[9]) + 1
redis.call('HSET', sale, 'remaining', remaining, 'reserved', tonumber(s[8]) + qty, 'v', v)
redis.call('HINCRBY', buyers, user, qty)
redis.call('HSET', idem, idem_field, order_id)
local order = {id = order_id, user_id = user, quantity = qty, price_cents = price, status = 'reserved',
               key = key, created_at = now, pay_by = now + timeout_ms, v = 1}
if ref ~= '' then order.ref = ref end
local record = cjson.encode(order)
redis.call('HSET', orders, order_id, record)
redis.call('ZADD', expiry, now + timeout_ms, order_id)
redis.call('XADD', log, '*', 'order', record)
return {'reserved', record, remaining, v}
