// k6 load test for HelixAgent's chat completions (the Python equivalent is load_test.py beside it):
//
//   k6 run --vus 100 --duration 30s deploy/loadtest/load-test.js
//   k6 run -e BASE_URL=http://127.0.0.1:8080 -e API_KEY="$KEY" -e MODEL=gpt-4o-mini \
//          --vus 100 --duration 30s deploy/loadtest/load-test.js
//
// Every response is checked (status 200, a choice with content, the gateway's request id); the thresholds
// fail the run (non-zero exit) when more than 1% of checks or requests fail or p95 is above P95_MS.
// Point it at a gateway you own: with a real provider behind it, every request costs money (use the
// mock provider, `providers: [{name: mock, type: mock}]`, to load the gateway itself).
import http from 'k6/http';
import { check } from 'k6';
import { Rate, Trend } from 'k6/metrics';

const BASE_URL = (__ENV.BASE_URL || 'http://127.0.0.1:8080').replace(/\/+$/, '');
const API_KEY = __ENV.API_KEY || '';
const MODEL = __ENV.MODEL || 'mock';
const P95_MS = Number(__ENV.P95_MS || 2000);
const STREAM = (__ENV.STREAM || 'false') === 'true';

const completionErrors = new Rate('completion_errors');
const completionTokens = new Trend('completion_tokens');

export const options = {
  // the defaults of the seed's `k6 run --vus 100 --duration 30s`; the command line overrides them
  vus: 100,
  duration: '30s',
  thresholds: {
    http_req_failed: ['rate<0.01'],
    checks: ['rate>0.99'],
    completion_errors: ['rate<0.01'],
    http_req_duration: [`p(95)<${P95_MS}`, `p(99)<${P95_MS * 2}`],
  },
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

const headers = { 'Content-Type': 'application/json' };
if (API_KEY) headers.Authorization = `Bearer ${API_KEY}`;

export default function () {
  const body = JSON.stringify({
    model: MODEL,
    max_tokens: 16,
    stream: STREAM,
    user: `k6-vu-${__VU}`,
    messages: [{ role: 'user', content: `Say hello in one short sentence. (iteration ${__ITER})` }],
  });
  const res = http.post(`${BASE_URL}/v1/chat/completions`, body, {
    headers,
    timeout: '60s',
    tags: { name: 'chat_completions' },
  });
  let parsed = null;
  if (!STREAM) {
    try { parsed = res.json(); } catch (e) { parsed = null; }
  }
  const ok = check(res, {
    'status is 200': (r) => r.status === 200,
    'has a request id': (r) => Boolean(r.headers['X-Helixagent-Request-Id']),
    'has an answer': (r) => (STREAM
      ? String(r.body).includes('data: [DONE]')
      : Boolean(parsed && parsed.choices && parsed.choices.length > 0
        && parsed.choices[0].message && typeof parsed.choices[0].message.content === 'string')),
  });
  completionErrors.add(!ok);
  if (parsed && parsed.usage) completionTokens.add(parsed.usage.completion_tokens || 0);
}
