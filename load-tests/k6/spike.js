// A spike: a calm base rate, a jump to SPIKE_RATE within seconds, a hold, and back down.
// The exchange must absorb it: errors under 0.1 % (no 503 overload refusals at this size),
// p99 under the deadline + 250 ms over the whole run, and k6 must not drop iterations.
//   k6 run -e API_KEYS=k1,k2 -e BASE_RATE=100 -e SPIKE_RATE=2000 load-tests/k6/spike.js
import http from 'k6/http';
import { check } from 'k6';
import { DEADLINE_MS, answeredLead, keyFor, requireKeys, submit } from './lib.js';

const BASE_RATE = Number(__ENV.BASE_RATE || 100);
const SPIKE_RATE = Number(__ENV.SPIKE_RATE || 2000);

export const options = {
  scenarios: {
    spike: {
      executor: 'ramping-arrival-rate',
      startRate: BASE_RATE,
      timeUnit: '1s',
      preAllocatedVUs: Number(__ENV.VUS || 200),
      maxVUs: Number(__ENV.MAX_VUS || Math.max(400, SPIKE_RATE)),
      stages: [
        { target: BASE_RATE, duration: '30s' },
        { target: SPIKE_RATE, duration: '5s' },
        { target: SPIKE_RATE, duration: '30s' },
        { target: BASE_RATE, duration: '5s' },
        { target: BASE_RATE, duration: '30s' },
      ],
    },
  },
  thresholds: {
    http_req_duration: [`p(99)<${DEADLINE_MS + 250}`],
    http_req_failed: ['rate<0.001'],
    dropped_iterations: ['count<1'],
  },
  summaryTrendStats: ['avg', 'med', 'p(90)', 'p(99)', 'p(99.9)', 'max'],
};

export function setup() {
  requireKeys();
}

export default function () {
  const res = submit(http, keyFor(__VU, __ITER), { scenario: 'spike' });
  check(res, {
    'answered 200 sold or pending': answeredLead,
    'no overload refusal': (r) => r.status !== 503,
  });
}
