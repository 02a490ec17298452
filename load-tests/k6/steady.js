// Steady supplier load at a constant arrival rate (open model: k6 starts iterations on
// schedule whatever the answers do, and counts `dropped_iterations` when it cannot).
// Thresholds: p99 under the ping deadline + 50 ms, errors under 0.1 %, nothing dropped.
//   k6 run -e API_KEYS=k1,k2 -e RATE=500 -e DURATION=2m load-tests/k6/steady.js
import http from 'k6/http';
import { check } from 'k6';
import { DEADLINE_MS, answeredLead, keyFor, requireKeys, submit } from './lib.js';

const RATE = Number(__ENV.RATE || 500);

export const options = {
  scenarios: {
    steady: {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: __ENV.DURATION || '2m',
      preAllocatedVUs: Number(__ENV.VUS || Math.max(50, Math.ceil(RATE / 2))),
      maxVUs: Number(__ENV.MAX_VUS || Math.max(200, RATE * 2)),
    },
  },
  thresholds: {
    http_req_duration: [`p(99)<${DEADLINE_MS + 50}`],
    http_req_failed: ['rate<0.001'],
    checks: ['rate>0.999'],
    dropped_iterations: ['count<1'],
  },
  summaryTrendStats: ['avg', 'med', 'p(90)', 'p(99)', 'p(99.9)', 'max'],
};

export function setup() {
  requireKeys();
}

export default function () {
  const res = submit(http, keyFor(__VU, __ITER), { scenario: 'steady' });
  check(res, {
    'answered 200 sold or pending': answeredLead,
    'carries rate-limit headers': (r) => r.headers['X-Ratelimit-Limit'] !== undefined,
  });
}
