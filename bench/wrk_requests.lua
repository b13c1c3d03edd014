-- Requests for wrk (bench.common.run_wrk): each one a random path of WRK_PATHS
-- (space-separated) with a random bearer token, one per line of the file WRK_TOKENS,
-- with the method WRK_METHOD (GET unless set; no body).
-- done() prints one JSON line that bench.common reads.
local tokens = {}
for line in io.lines(os.getenv("WRK_TOKENS")) do
  if #line > 0 then tokens[#tokens + 1] = line end
end
-- WRK_PATHS_FILE (one path per line) instead when there are too many for the environment.
local paths = {}
if os.getenv("WRK_PATHS_FILE") then
  for line in io.lines(os.getenv("WRK_PATHS_FILE")) do
    if #line > 0 then paths[#paths + 1] = line end
  end
else
  for path in string.gmatch(os.getenv("WRK_PATHS"), "[^ ]+") do paths[#paths + 1] = path end
end
local method = os.getenv("WRK_METHOD") or "GET"

-- Each wrk thread runs this file in a Lua state of its own: seed each differently.
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))

request = function()
  return wrk.format(method, paths[math.random(#paths)],
                    {["Authorization"] = "Bearer " .. tokens[math.random(#tokens)]})
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "non_2xx": %d, "errors": %d, "duration_us": %d, ' ..
    '"p50_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, e.status, e.connect + e.read + e.write + e.timeout, summary.duration,
    latency:percentile(50), latency:percentile(99), latency.max))
end
