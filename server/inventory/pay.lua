-- Mark a reserved order paid. Paying and expiring are both state changes of the
-- same order in this one slot, so exactly one of them happens.
-- Times in milliseconds, from the Redis server's clock (the now_ms.lua prelude).
-- KEYS[1]  sale hash
-- KEYS[2]  orders hash
-- KEYS[3]  expiry sorted set
-- KEYS[4]  log stream
-- KEYS[5]  captures sorted set: the order is due there for a capture, should the paying request not
--          get to it (its answer lost, its process gone); the request removes it once it captured
-- ARGV[1]  order id
-- ARGV[2]  payer's user id (must be the buyer)
-- ARGV[3]  payment reference from the provider
-- ARGV[4]  ms from now until the capture is due
-- Returns {status, order JSON or ''}; status is 'paid' (now), 'already_paid', 'no_order',
--   'expired' (pay-by passed, or already released as expired), 'cancelled'
local sale, orders, expiry, log, captures = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local order_id, user, payment, capture_after = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])

local now = now_ms()

local record = redis.call('HGET', orders, order_id)
if not record then
  return {'no_order', ''}
end
local order = cjson.decode(record)
if order.user_id ~= user then
  return {'no_order', ''}
end
if order.status == 'paid' then
  return {'already_paid', record}
end
if order.status ~= 'reserved' then
  return {order.status, record}
end
if now >= order.pay_by then
  -- The sweeper releases it; the stock is not sold twice either way.
  return {'expired', record}
end

order.status = 'paid'
order.paid_at = now
order.payment = payment
order.v = order.v + 1
record = cjson.encode(order)
redis.call('HSET', orders, order_id, record)
redis.call('HINCRBY', sale, 'reserved', -order.quantity)
redis.call('HINCRBY', sale, 'paid', order.quantity)
redis.call('HINCRBY', sale, 'v', 1)
redis.call('ZREM', expiry, order_id)
redis.call('ZADD', captures, now + capture_after, order_id)
redis.call('XADD', log, '*', 'order', record)
return {'paid', record}
