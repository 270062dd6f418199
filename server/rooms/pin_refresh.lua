-- Replace the pinned product's copy with its edited version, and tell the room, only if that
-- product is still the one pinned: an edit racing a pin of another product never brings the
-- old one back.
-- KEYS[1]  the room's state hash (field `pin`: the pinned product, JSON)
-- KEYS[2]  the room's pub/sub channel
-- ARGV[1]  the product's id
-- ARGV[2]  the product, JSON
-- ARGV[3]  the message to publish (audience byte + `pin` event)
-- ARGV[4]  publish command: SPUBLISH or PUBLISH
-- Returns 1 if replaced, else 0
local current = redis.call('HGET', KEYS[1], 'pin')
if not current or cjson.decode(current).id ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'pin', ARGV[2])
redis.call(ARGV[4], KEYS[2], ARGV[3])
return 1
