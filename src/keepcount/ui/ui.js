/*
 * keepcount's live page: polls state.json (next to the page) about once a
 * second and renders it. The document's schema is in keepcount/ui/state.py.
 *
 * Safety: every name, label value, help text, node id and event field is
 * data. It reaches the DOM only as text (textContent, createTextNode,
 * dataset) or on a canvas (fillText); never through innerHTML.
 *
 * For tests and the curious, the page keeps in window:
 *   keepcountSeries[name]  = {t: [...], total: [...], nodes: {node: [...]}}  the charts' points
 *   keepcountTransitions   = [{node, state, t}, ...]   every state change seen, in time order
 *   keepcountState         = the last state.json document
 *   keepcountPolls         = answers received
 *   keepcountXRange(name)  = [min, max] of that counter's chart's time axis (seconds)
 */
(function () {
  'use strict';

  const STATE_URL = 'ui/state.json'; // relative: the page is served at .../ui
  const POLL_MS = 1000;
  const WINDOW_S = 600; // seconds of points kept per chart
  const MAX_CHARTS = 12; // counter names shown with a chart (the rest as tables only)
  const MAX_ROWS = 40; // label sets listed per counter
  const MAX_TRANSITIONS = 2000;
  const SHOWN_TRANSITIONS = 40;
  const KNOWN_STATES = new Set([
    'starting', 'restoring', 'ready', 'unresponsive', 'paused', 'fenced', 'down',
    'unconfirmed', 'claimed', 'released', 'up', 'maint', 'drain', 'nolb', 'standby',
  ]);
  const PALETTE = ['#2f6fde', '#d9480f', '#2b8a3e', '#ae3ec9', '#0b7285', '#e67700', '#5c940d', '#c2255c', '#495057'];
  const MARKS = {
    down: { color: '#c4221b', dash: [6, 4] },
    fenced: { color: '#c4221b', dash: [2, 3] },
    paused: { color: '#7a3fb0', dash: [6, 4] },
    ready: { color: '#1a7f37', dash: [2, 3] },
  };

  // name -> {t, total, nodes}; null prototypes: a name may be any valid metric name ("__proto__" too).
  const series = Object.create(null);
  const transitions = [];
  const seenTransitions = new Set();
  const lastState = new Map(); // node -> last state recorded in transitions
  const sections = new Map(); // counter name -> {root, help, chartBox, chart, chartNodes, thead, tbody, note}

  window.keepcountSeries = series;
  window.keepcountTransitions = transitions;
  window.keepcountState = null;
  window.keepcountPolls = 0;
  window.keepcountXRange = (name) => {
    const sec = sections.get(name);
    return sec && sec.chart ? [sec.chart.scales.x.min, sec.chart.scales.x.max] : null;
  };

  // -- small DOM helpers: text only ------------------------------------------

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function cell(row, text, className) {
    const td = el('td', className, text);
    row.appendChild(td);
    return td;
  }

  function stateBadge(state) {
    const s = String(state);
    const key = s.toLowerCase();
    return el('span', 'state state-' + (KNOWN_STATES.has(key) ? key : 'other'), s);
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function fmtTime(t) {
    const d = new Date(t * 1000);
    const pad = (n, w) => String(n).padStart(w || 2, '0');
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
  }

  function fmtSeconds(s) {
    if (s === null || s === undefined) return '—';
    if (s < 60) return `${s.toFixed(1)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${Math.floor(s % 60)} s`;
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  }

  function show(value) {
    return value === null || value === undefined ? '—' : String(value);
  }

  function labelText(labels) {
    const keys = Object.keys(labels || {}).sort();
    if (!keys.length) return '(no labels)';
    return keys.map((k) => `${k}=${JSON.stringify(String(labels[k]))}`).join(', ');
  }

  // -- transitions -----------------------------------------------------------

  function recordTransition(node, state, t) {
    const key = `${node}\u0000${t}\u0000${state}`;
    if (seenTransitions.has(key)) return;
    seenTransitions.add(key);
    transitions.push({ node, state, t });
    if (transitions.length > 1 && transitions[transitions.length - 2].t > t) {
      transitions.sort((a, b) => a.t - b.t);
    }
    while (transitions.length > MAX_TRANSITIONS) transitions.shift();
    lastState.set(node, transitions.filter((x) => x.node === node).pop().state);
  }

  function mergeTransitions(doc) {
    for (const n of doc.nodes) {
      const history = Array.isArray(n.history) ? n.history : [];
      for (const h of history) recordTransition(n.id, h.state, h.t);
      // A node known only by its record (a node's page lists the store's
      // other ids): a change is seen when the page sees it.
      if (!history.length && lastState.get(n.id) !== n.state) {
        recordTransition(n.id, n.state, typeof n.since === 'number' ? n.since : doc.time);
      }
    }
  }

  // -- nodes and load balancer ------------------------------------------------

  function renderNodes(doc) {
    const tbody = document.querySelector('#nodes tbody');
    clear(tbody);
    const backends = (doc.lb && doc.lb.backends) || {};
    for (const n of doc.nodes) {
      const row = el('tr');
      row.dataset.node = n.id;
      row.dataset.state = n.state;
      const id = cell(row, n.id);
      if (doc.self === n.id) id.appendChild(el('span', 'muted small', ' (this node)'));
      const st = cell(row, null);
      st.appendChild(stateBadge(n.state));
      if (n.detail) st.appendChild(el('span', 'detail', n.detail));
      cell(row, typeof n.since === 'number' ? fmtSeconds(Math.max(doc.time - n.since, 0)) : '—', 'num');
      cell(row, show(n.epoch), 'num');
      cell(row, typeof n.uptime === 'number' ? fmtSeconds(n.uptime) : '—', 'num');
      cell(row, show(n.restarts), 'num');
      cell(row, show(n.incarnation), 'num');
      cell(row, show(n.pid), 'num');
      cell(row, show(n.slot));
      const lbCell = cell(row, null);
      if (n.slot && Object.prototype.hasOwnProperty.call(backends, n.slot)) {
        lbCell.appendChild(stateBadge(backends[n.slot]));
      } else {
        lbCell.textContent = '—';
      }
      tbody.appendChild(row);
    }
    const note = document.getElementById('nodes-note');
    note.textContent = doc.source === 'node'
      ? `As node ${doc.self} sees it: itself, and the store's record of every other node id ` +
        '(claimed or released; restarts are known to the supervisor only).'
      : '';
  }

  function renderLb(doc) {
    const summary = document.getElementById('lb-summary');
    const tbody = document.querySelector('#lb tbody');
    clear(tbody);
    if (!doc.lb) {
      summary.textContent = 'A node does not know the load balancer\'s view: open the ' +
        'supervisor\'s page (`keepcount cluster up` prints its address).';
      return;
    }
    summary.textContent = `${show(doc.lb.kind)} at ${show(doc.lb.url)}` +
      (doc.lb.error ? ` — cannot read its state: ${doc.lb.error}` : '');
    const names = Object.keys(doc.lb.backends || {}).sort();
    // A slot no incarnation holds waits for the next one (each node has two,
    // so a new incarnation can start beside the old): standby, not down.
    const standby = new Set(Array.isArray(doc.lb.standby) ? doc.lb.standby : []);
    for (const name of names) {
      const row = el('tr');
      row.dataset.backend = name;
      cell(row, name);
      const st = cell(row, null);
      if (standby.has(name)) {
        st.appendChild(stateBadge('standby'));
        st.appendChild(el('span', 'muted small', ` (${doc.lb.backends[name]})`));
      } else {
        st.appendChild(stateBadge(doc.lb.backends[name]));
      }
      tbody.appendChild(row);
    }
  }

  // -- counters: points, charts, tables ---------------------------------------

  function group(doc) {
    const byName = new Map();
    for (const c of doc.counters) {
      if (!byName.has(c.name)) byName.set(c.name, []);
      byName.get(c.name).push(c);
    }
    return byName;
  }

  function addPoints(byName, t) {
    for (const [name, rows] of byName) {
      let s = series[name];
      if (!s) {
        s = series[name] = { t: [], total: [], nodes: Object.create(null) };
      }
      if (s.t.length && t <= s.t[s.t.length - 1]) continue; // the same read again
      let total = 0;
      const parts = Object.create(null);
      for (const r of rows) {
        total += r.value;
        for (const [node, v] of Object.entries(r.nodes || {})) parts[node] = (parts[node] || 0) + v;
      }
      for (const node of Object.keys(parts)) {
        if (!s.nodes[node]) s.nodes[node] = new Array(s.t.length).fill(null);
      }
      s.t.push(t);
      s.total.push(total);
      for (const node of Object.keys(s.nodes)) {
        s.nodes[node].push(node in parts ? parts[node] : null);
      }
      // Keep the last WINDOW_S seconds.
      let drop = 0;
      while (drop < s.t.length - 1 && s.t[drop] < t - WINDOW_S) drop++;
      if (drop) {
        s.t.splice(0, drop);
        s.total.splice(0, drop);
        for (const node of Object.keys(s.nodes)) s.nodes[node].splice(0, drop);
      }
    }
  }

  function drawMarks(u) {
    const ctx = u.ctx;
    const [x0, x1] = [u.scales.x.min, u.scales.x.max];
    if (x0 === null || x1 === null || x0 === undefined) return;
    const dpr = window.devicePixelRatio || 1;
    const top = u.bbox.top;
    const bottom = u.bbox.top + u.bbox.height;
    const wasReady = new Set();
    let drawn = 0;
    ctx.save();
    ctx.font = `${10 * dpr}px system-ui, sans-serif`;
    ctx.lineWidth = 1 * dpr;
    for (const tr of transitions) {
      const mark = MARKS[tr.state];
      // A "ready" is marked only when it ends an outage, not at a node's first start.
      const again = tr.state === 'ready' && wasReady.has(tr.node);
      if (tr.state === 'ready') wasReady.add(tr.node);
      if (!mark || (tr.state === 'ready' && !again)) continue;
      if (tr.t < x0 || tr.t > x1) continue;
      const x = Math.round(u.valToPos(tr.t, 'x', true));
      ctx.strokeStyle = mark.color;
      ctx.setLineDash(mark.dash.map((d) => d * dpr));
      ctx.beginPath();
      ctx.moveTo(x, top);
      ctx.lineTo(x, bottom);
      ctx.stroke();
      if (tr.state === 'ready') continue; // unlabelled: the legend under the chart says it
      // The label beside the line, on one of three rows so that close marks stay legible.
      const label = `${tr.node} ${tr.state}`;
      const y = top + (11 + 12 * (drawn % 3)) * dpr;
      const right = x + 4 * dpr + ctx.measureText(label).width > u.bbox.left + u.bbox.width;
      ctx.textAlign = right ? 'right' : 'left';
      ctx.fillStyle = mark.color;
      ctx.fillText(label, right ? x - 4 * dpr : x + 4 * dpr, y);
      drawn += 1;
    }
    ctx.restore();
  }

  function chartData(s, nodes) {
    if (s.t.length === 1) {
      // uPlot sizes a one-point x axis by the value's magnitude (years, for
      // Unix seconds) without asking the range function: lead with an empty
      // x a minute earlier so that a chart opened a moment ago shows a minute.
      return [[s.t[0] - 60, s.t[0]], [null, s.total[0]], ...nodes.map((n) => [null, s.nodes[n][0]])];
    }
    return [s.t, s.total, ...nodes.map((n) => s.nodes[n])];
  }

  function makeChart(sec, name, nodes) {
    if (sec.chart) sec.chart.destroy();
    clear(sec.chartBox);
    const s = series[name];
    const width = Math.max(sec.chartBox.clientWidth || 0, 320);
    const opts = {
      width,
      height: 220,
      // At least a minute wide: a chart opened a moment ago shows seconds, not years.
      scales: { x: { time: true, range: (u, min, max) => [Math.min(min, max - 60), max] } },
      series: [
        {},
        { label: 'cluster total', stroke: '#1d2330', width: 2, spanGaps: true },
        ...nodes.map((n, i) => ({
          label: n, stroke: PALETTE[i % PALETTE.length], width: 1.25, spanGaps: true,
        })),
      ],
      axes: [{}, { size: 70 }],
      hooks: { draw: [drawMarks] },
    };
    sec.chart = new window.uPlot(opts, chartData(s, nodes), sec.chartBox);
    sec.chartNodes = nodes;
  }

  function newSection(name) {
    const root = el('div', 'counter');
    root.dataset.counter = name;
    root.appendChild(el('h3', null, name));
    const help = el('p', 'help');
    root.appendChild(help);
    const chartBox = el('div', 'chart');
    root.appendChild(chartBox);
    root.appendChild(el('p', 'note marks',
      'Marks: red dashed, a node went down (killed or exited); red dotted, fenced (lost its ' +
      'claim, replaced); purple, paused; green dotted, ready again. Each line is continuous: ' +
      'a node\'s part stays in the store while it is down.'));
    const table = el('table', 'series');
    const thead = el('thead');
    const tbody = el('tbody');
    table.appendChild(thead);
    table.appendChild(tbody);
    root.appendChild(table);
    const note = el('p', 'note');
    root.appendChild(note);
    document.getElementById('counters').appendChild(root);
    return { root, help, chartBox, marks: root.querySelector('.marks'), chart: null, chartNodes: [], thead, tbody, note };
  }

  function renderTable(sec, rows) {
    const nodes = [...new Set(rows.flatMap((r) => Object.keys(r.nodes || {})))].sort();
    clear(sec.thead);
    const head = el('tr');
    head.appendChild(el('th', null, 'labels'));
    head.appendChild(el('th', 'num', 'total'));
    for (const n of nodes) head.appendChild(el('th', 'num', n));
    sec.thead.appendChild(head);
    clear(sec.tbody);
    for (const r of rows.slice(0, MAX_ROWS)) {
      const row = el('tr');
      cell(row, labelText(r.labels), 'labels');
      cell(row, r.value.toLocaleString('en-US'), 'num total');
      for (const n of nodes) {
        const v = r.nodes ? r.nodes[n] : undefined;
        cell(row, v === undefined ? '' : v.toLocaleString('en-US'), 'num');
      }
      sec.tbody.appendChild(row);
    }
    sec.note.textContent = rows.length > MAX_ROWS
      ? `… and ${rows.length - MAX_ROWS} more label sets (GET /v1/cluster/counters has them all)`
      : '';
  }

  function renderCounters(doc, byName) {
    const note = document.getElementById('counters-note');
    const notes = [];
    if (doc.counters_error) notes.push(`Counters not updated: ${doc.counters_error}`);
    if (doc.truncated) notes.push(`${doc.truncated} more series not shown.`);
    if (!byName.size && !doc.counters_error) notes.push('No counter yet.');
    note.textContent = notes.join(' ');
    if (doc.counters_error && !byName.size) return; // keep what is shown: the last good read
    let charted = 0;
    for (const [name, rows] of byName) {
      let sec = sections.get(name);
      if (!sec) {
        sec = newSection(name);
        sections.set(name, sec);
      }
      sec.help.textContent = rows[0].help || '';
      renderTable(sec, rows);
      if (charted >= MAX_CHARTS) {
        sec.chartBox.hidden = true;
        sec.marks.hidden = true;
        continue;
      }
      charted += 1;
      sec.chartBox.hidden = false;
      sec.marks.hidden = false;
      const nodes = Object.keys(series[name].nodes).sort();
      if (!sec.chart || nodes.join('\u0000') !== sec.chartNodes.join('\u0000')) {
        makeChart(sec, name, nodes);
      } else {
        sec.chart.setData(chartData(series[name], nodes));
      }
    }
    for (const [name, sec] of sections) {
      if (!byName.has(name)) {
        if (sec.chart) sec.chart.destroy();
        sec.root.remove();
        sections.delete(name);
      }
    }
  }

  // -- logs ------------------------------------------------------------------

  function renderTransitions() {
    const list = document.getElementById('transitions');
    clear(list);
    for (const tr of transitions.slice(-SHOWN_TRANSITIONS).reverse()) {
      const li = el('li');
      li.dataset.node = tr.node;
      li.dataset.state = tr.state;
      li.appendChild(document.createTextNode(`${fmtTime(tr.t)}  ${tr.node}  `));
      li.appendChild(stateBadge(tr.state));
      list.appendChild(li);
    }
  }

  function renderEvents(doc) {
    const section = document.getElementById('events-section');
    section.hidden = doc.source !== 'cluster';
    const list = document.getElementById('events');
    clear(list);
    for (const ev of [...(doc.events || [])].reverse()) {
      const rest = Object.entries(ev)
        .filter(([k]) => !['t', 'event', 'node', 'seq'].includes(k))
        .map(([k, v]) => `${k}=${typeof v === 'string' ? v : JSON.stringify(v)}`)
        .join(' ');
      const text = `${typeof ev.t === 'number' ? fmtTime(ev.t) : ''}  ${ev.event}` +
        `${ev.node ? '  ' + ev.node : ''}${rest ? '  ' + rest : ''}`;
      list.appendChild(el('li', null, text));
    }
  }

  // -- the loop --------------------------------------------------------------

  function setStatus(kind, text) {
    const status = document.getElementById('status');
    status.dataset.status = kind;
    status.textContent = text;
  }

  function update(doc) {
    window.keepcountState = doc;
    window.keepcountPolls += 1;
    document.getElementById('source').textContent = doc.source === 'cluster'
      ? 'cluster (from its supervisor)'
      : `node ${doc.self}`;
    document.getElementById('updated').textContent = `as of ${fmtTime(doc.time)}`;
    mergeTransitions(doc);
    renderNodes(doc);
    renderLb(doc);
    const byName = group(doc);
    if (!doc.counters_error || byName.size) {
      addPoints(byName, typeof doc.counters_time === 'number' ? doc.counters_time : doc.time);
    }
    renderCounters(doc, byName);
    renderTransitions();
    renderEvents(doc);
  }

  async function poll() {
    let doc = null;
    try {
      const resp = await fetch(STATE_URL, { cache: 'no-store', headers: { accept: 'application/json' } });
      if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
      doc = await resp.json();
    } catch (err) {
      setStatus('error', `cannot read state.json (${err && err.message ? err.message : err}); retrying`);
    }
    try {
      if (doc !== null) {
        update(doc);
        setStatus('live', 'live');
      }
    } catch (err) {
      setStatus('error', `cannot show state.json: ${err && err.message ? err.message : err}`);
      throw err; // to the console, where a bug belongs
    } finally {
      window.setTimeout(poll, POLL_MS);
    }
  }

  window.addEventListener('resize', () => {
    for (const sec of sections.values()) {
      if (sec.chart && !sec.chartBox.hidden) {
        sec.chart.setSize({ width: Math.max(sec.chartBox.clientWidth, 320), height: 220 });
      }
    }
  });

  poll();
}());
