-- The sale's start is announced once, by one caller of all processes, as a new version of the
-- sale (clients apply a sale event only if its `v` is higher than the last one they saw); never
-- once it has ended (an end racing the announcement is the newer news).
-- KEYS[1]  sale hash
-- Returns the sale's new version, or 0 if there is no start to announce
if (tonumber(redis.call('HGET', KEYS[1], 'ended_at')) or 0) > 0 then
  return 0
end
if redis.call('HSETNX', KEYS[1], 'started_announced', 1) == 0 then
  return 0
end
return redis.call('HINCRBY', KEYS[1], 'v', 1)
