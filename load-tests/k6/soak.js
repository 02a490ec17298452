// A soak: a moderate constant arrival rate for a long time (default 1 h), to show leaks and
// slow drifts: latency must not creep (same thresholds as steady.js) and errors stay under
// 0.1 %. Watch the exchange's memory and storage size beside it (Grafana, or
// `ps -o rss= -p <pid>`), and compare the first and last minutes of the k6 output.
//   k6 run -e API_KEYS=k1,k2 -e RATE=200 -e DURATION=1h load-tests/k6/soak.js
import http from 'k6/http';
import { check } from 'k6';
import { DEADLINE_MS, answeredLead, keyFor, requireKeys, submit } from './lib.js';

const RATE = Number(__ENV.RATE || 200);

export const options = {
  scenarios: {
    soak: {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: __ENV.DURATION || '1h',
      preAllocatedVUs: Number(__ENV.VUS || Math.max(50, Math.ceil(RATE / 2))),
      maxVUs: Number(__ENV.MAX_VUS || Math.max(200, RATE * 2)),
    },
  },
  thresholds: {
    http_req_duration: [`p(99)<${DEADLINE_MS + 50}`, `p(50)<${DEADLINE_MS}`],
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
  const res = submit(http, keyFor(__VU, __ITER), { scenario: 'soak' });
  check(res, { 'answered 200 sold or pending': answeredLead });
}
