// agent_websocket_bridge's observed value on /health counts open
// connections and requests in flight.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { startNetra, Client } from './support.mjs';
import { testHome, waitObserved, runEnd } from './testhome.mjs';

test('observedValue.connections and runs_in_flight follow the clients', async () => {
  const srv = await startNetra({ env: { NETRA_HOME: testHome() } });
  try {
    await waitObserved(srv.port, (o) => o.connections === 0 && o.runs_in_flight === 0);
    const cs = await Promise.all([1, 2, 3].map((i) => Client.connect(srv.url(), { headers: { 'X-Netra-User': `h${i}` } })));
    const seen = await waitObserved(srv.port, (o) => o.connections === 3);
    assert.equal(seen.runs_in_flight, 0);

    const { result } = await cs[0].rpc('agents/run', { name: 'wait', input: { ms: 60000 } });
    const busy = await waitObserved(srv.port, (o) => o.runs_in_flight > 0);
    assert.equal(busy.connections, 3);
    await cs[0].rpc('agents/cancel', { run_id: result.run_id });
    await runEnd(cs[0], result.run_id, 10000);
    await waitObserved(srv.port, (o) => o.runs_in_flight === 0);

    await cs[2].close();
    await waitObserved(srv.port, (o) => o.connections === 2);
    cs[1].ws.terminate();
    await waitObserved(srv.port, (o) => o.connections === 1);
    await cs[0].close();
    await waitObserved(srv.port, (o) => o.connections === 0);
  } finally {
    await srv.stop();
  }
});
