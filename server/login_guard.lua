-- One login attempt's rate limits, in one step: a bucket per account and address (tries from
-- one address at one account), then the account's own (tries from anywhere). An address with no
-- try at this account for ARGV[5] ms (no mark) may try even when the account's bucket is empty:
-- a crowd of addresses guessing cannot keep the owner out, and each of them gets one guess per
-- ARGV[5] ms past the account's limit. Loaded after the now_ms.lua and gcra.lua preludes.
-- KEYS[1]  the account's bucket
-- KEYS[2]  the account-and-address bucket
-- KEYS[3]  the account-and-address mark: present while the address has tried lately (all three
--          share the account's hash tag: one slot)
-- ARGV[1], ARGV[2]  the account's ms per unit and burst
-- ARGV[3], ARGV[4]  the pair's ms per unit and burst
-- ARGV[5]  how long a try marks the address, ms
-- Returns {allowed (1|0), retry_after_ms, account spent (1|0)}
local now = now_ms()
local clean = redis.call('EXISTS', KEYS[3]) == 0
local pair_new, pair_wait = gcra(KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4]), 1, now)
if pair_wait > 0 then
  return {0, pair_wait, 0}
end
local account_new, account_wait = gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), 1, now)
if account_wait > 0 and not clean then
  return {0, account_wait, 0}
end
gcra_spend(KEYS[2], pair_new, now)
redis.call('SET', KEYS[3], 1, 'PX', ARGV[5])
if account_wait > 0 then
  return {1, 0, 0}
end
gcra_spend(KEYS[1], account_new, now)
return {1, 0, 1}
