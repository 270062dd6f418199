-- Create a sale's hash, unless it exists: a sale is created once, and never after it was archived
-- (archive_sale.lua leaves a hash behind, also for a sale whose launch died before this ran).
-- KEYS[1]  sale hash
-- ARGV     field, value, field, value, ...
-- Returns 1 if created, 0 if the hash was there
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
