-- The sale's start is announced once, by one caller of all processes, as a new version of the
-- sale (clients apply a sale event only if its `v` is higher than the last one they saw).
-- KEYS[1]  sale hash
-- Returns the sale's new version, or 0 if the start was announced already
if redis.call('HSETNX', KEYS[1], 'started_announced', 1) == 0 then
  return 0
end
return redis.call('HINCRBY', KEYS[1], 'v', 1)
