-- Release a reserved order's stock back to the sale: on expiry (the pay-by time
-- passed) or on cancellation by its buyer. Idempotent: an order is released at
-- most once, however many sweepers or retries run it.
-- Times in milliseconds, from the Redis server's clock (the now_ms.lua prelude).
-- KEYS[1]  sale hash
-- KEYS[2]  buyers hash
-- KEYS[3]  orders hash
-- KEYS[4]  expiry sorted set
-- KEYS[5]  log stream
-- ARGV[1]  order id
-- ARGV[2]  'expired' (only once pay-by has passed) or 'cancelled' (only by the buyer)
-- ARGV[3]  the buyer's user id, for 'cancelled'; '' for 'expired'
-- Returns {status, order JSON or '', remaining}; status is 'released' (now), 'not_due',
--   'no_order', or the order's current status when it is no longer reserved
local sale, buyers, orders, expiry, log = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local order_id, reason, user = ARGV[1], ARGV[2], ARGV[3]

local now = now_ms()

local record = redis.call('HGET', orders, order_id)
if not record then
  redis.call('ZREM', expiry, order_id)
  return {'no_order', '', 0}
end
local order = cjson.decode(record)
if reason == 'cancelled' and order.user_id ~= user then
  return {'no_order', '', 0}
end
if order.status ~= 'reserved' then
  redis.call('ZREM', expiry, order_id)
  return {order.status, record, 0}
end
if reason == 'expired' and now < order.pay_by then
  return {'not_due', record, 0}
end

order.status = reason
order.released_at = now
order.v = order.v + 1
record = cjson.encode(order)
redis.call('HSET', orders, order_id, record)
local remaining = redis.call('HINCRBY', sale, 'remaining', order.quantity)
redis.call('HINCRBY', sale, 'reserved', -order.quantity)
redis.call('HINCRBY', sale, 'v', 1)
redis.call('HINCRBY', buyers, order.user_id, -order.quantity)
redis.call('ZREM', expiry, order_id)
redis.call('XADD', log, '*', 'order', record)
return {'released', record, remaining}
