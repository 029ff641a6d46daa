// portfwd dashboard: reads /api/v1/events (fetch + stream reader), draws the status, posts actions.
// Everything shown comes from the network: it goes into the page as textContent, never as markup.
(() => {
  'use strict';

  const TOKEN_KEY = 'portfwd.token';
  const SVGNS = 'http://www.w3.org/2000/svg';
  const MAX_POINTS = 300;
  const GRAPH_W = 300;
  const GRAPH_H = 80;
  const STALL_MS = 20000; // no byte for this long (status comes every second): reconnect

  const $ = (id) => document.getElementById(id);

  const st = {
    snap: null,
    info: null,
    series: new Map(), // "rule:NAME" -> [[t, up, down], ...]
    interval: 1,
    offset: 0, // server wall clock minus ours, seconds
    sort: { key: '', dir: 1 },
    filter: '',
    ctrl: null,
    retry: 0,
    backoff: 2000,
    seen: 0,
    pending: new Set(),
  };

  // -- token -----------------------------------------------------------------------------------

  function getToken() {
    try { return sessionStorage.getItem(TOKEN_KEY) || ''; } catch (_) { return ''; }
  }
  function setToken(value) {
    try {
      if (value) sessionStorage.setItem(TOKEN_KEY, value);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch (_) { /* storage disabled: the token lives for this request only */ }
  }
  function authHeaders(extra) {
    const headers = Object.assign({}, extra);
    const token = getToken();
    if (token) headers.Authorization = 'Bearer ' + token;
    return headers;
  }

  // -- formatting ------------------------------------------------------------------------------

  const now = () => Date.now() / 1000 + st.offset;
  const num = (v) => (typeof v === 'number' && isFinite(v) ? v : 0);
  const str = (v) => (v === null || v === undefined ? '' : String(v));
  const dash = (v) => str(v) || '-';

  function bytes(n) {
    let v = num(n);
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return i ? v.toFixed(1) + ' ' + units[i] : Math.round(v) + ' B';
  }
  const rate = (r) => (num(r) >= 0.5 ? bytes(Math.round(r)) + '/s' : '-');

  // Seconds as "42 s", "5 min 3 s", "2 h 10 min", "3 d 4 h".
  function dur(seconds, full) {
    let s = Math.max(0, Math.floor(num(seconds)));
    if (s < 60) return s + ' s';
    const d = Math.floor(s / 86400); s -= d * 86400;
    const h = Math.floor(s / 3600); s -= h * 3600;
    const m = Math.floor(s / 60); s -= m * 60;
    const parts = [];
    if (d) parts.push(d + ' d');
    if (h || (d && full)) parts.push(h + ' h');
    if (!d || full) parts.push(m + ' min');
    if ((!d && !h) || full) parts.push(s + ' s');
    return parts.slice(0, full ? 4 : 2).join(' ');
  }
  function rel(t) {
    if (!num(t)) return '-';
    const d = num(t) - now();
    return d >= 1 ? 'in ' + dur(d) : dur(-d) + ' ago';
  }
  const lasted = (s) => (num(s) < 10 ? num(s).toFixed(3) + ' s' : dur(s));
  function errs(map) {
    if (!map || typeof map !== 'object') return '-';
    return Object.keys(map).sort().map((k) => k + ':' + map[k]).join(', ') || '-';
  }
  const mode = (r) => str(r.mode) || 'running';
  const pair = (a, b) => num(a) + '/' + num(b);
  const B = (n) => ({ t: bytes(n), v: Math.trunc(num(n)) });
  function countdown(expires, state) {
    if (expires === null || expires === undefined || !num(expires)) return state === 'up' ? 'permanent' : '-';
    const left = num(expires) - now();
    return left > 0 ? 'in ' + dur(left, true) : 'expired';
  }

  // -- DOM helpers -----------------------------------------------------------------------------

  function el(tag, props, ...kids) {
    const node = document.createElement(tag);
    if (props) {
      for (const k of Object.keys(props)) {
        if (k === 'class') node.className = props[k];
        else if (k === 'text') node.textContent = props[k];
        else node.setAttribute(k, props[k]);
      }
    }
    for (const kid of kids) if (kid !== null && kid !== undefined) node.append(kid);
    return node;
  }
  function svg(tag, attrs) {
    const node = document.createElementNS(SVGNS, tag);
    for (const k of Object.keys(attrs || {})) node.setAttribute(k, attrs[k]);
    return node;
  }
  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }
  function setAttr(node, name, value) {
    if (value === null || value === undefined) {
      if (node.hasAttribute(name)) node.removeAttribute(name);
    } else if (node.getAttribute(name) !== String(value)) {
      node.setAttribute(name, String(value));
    }
  }
  function show(node, visible) {
    if (node.hidden === visible) node.hidden = !visible;
  }
  function section(id, visible, empty) {
    const sec = $(id);
    show(sec, visible);
    const none = sec.querySelector(':scope > p.none');
    if (none) show(none, empty);
    const wrap = sec.querySelector(':scope > div.scroll');
    if (wrap) show(wrap, !empty);
  }

  // A row spec: { cls, attrs(d), cells: [[className, d => text | {t, v}]], buttons: [[cls, label]],
  // what(d) (for the buttons' labels), btn(d) (attributes of each button) }; or a spec with its
  // own build(d) and update(node, d).
  function build(spec, d) {
    if (spec.build) return spec.build(d);
    const tr = document.createElement('tr');
    if (spec.cls) tr.className = spec.cls;
    tr.cells_ = spec.cells.map(([cls]) => tr.appendChild(el('td', cls ? { class: cls } : null)));
    if (spec.buttons) {
      const td = tr.appendChild(el('td', { class: 'actions' }));
      tr.buttons_ = spec.buttons.map(([cls, label]) => td.appendChild(el('button', { type: 'button', class: cls, text: label })));
    }
    return tr;
  }
  function update(spec, tr, d) {
    tr.data_ = d;
    if (spec.update) { spec.update(tr, d); return; }
    if (spec.attrs) {
      const attrs = spec.attrs(d);
      for (const k of Object.keys(attrs)) setAttr(tr, k, attrs[k]);
    }
    spec.cells.forEach(([, fn], i) => {
      const td = tr.cells_[i];
      const out = fn(d);
      if (out !== null && typeof out === 'object') {
        setText(td, str(out.t));
        if ('v' in out) setAttr(td, 'data-value', out.v);
        if ('title' in out) setAttr(td, 'title', out.title);
      } else {
        setText(td, str(out));
      }
    });
    if (spec.buttons) {
      const attrs = spec.btn(d);
      const what = spec.what(d);
      spec.buttons.forEach(([, label], i) => {
        const b = tr.buttons_[i];
        for (const k of Object.keys(attrs)) setAttr(b, k, attrs[k]);
        setAttr(b, 'aria-label', label + ' ' + what);
      });
    }
  }

  // Keyed, in-place update of a container's children: entries [{k, s: spec, d: data}] in order.
  // Rows keep their nodes (and so focus, selection and scroll) from one status to the next.
  function sync(parent, entries) {
    const old = parent.rows_ || new Map();
    const next = new Map();
    for (const e of entries) {
      let node = old.get(e.k);
      if (!node || node.spec_ !== e.s || next.has(e.k)) {
        node = build(e.s, e.d);
        node.spec_ = e.s;
      }
      update(e.s, node, e.d);
      next.set(e.k, node);
    }
    const keep = new Set(next.values());
    for (const node of old.values()) if (!keep.has(node)) node.remove();
    for (const child of Array.from(parent.children)) if (!keep.has(child)) child.remove();
    let cursor = parent.firstElementChild;
    for (const node of next.values()) {
      if (node === cursor) cursor = cursor.nextElementSibling;
      else parent.insertBefore(node, cursor);
    }
    parent.rows_ = next;
  }

  function subTable(headers) {
    const tbody = el('tbody');
    const table = el('table', { class: 'sub' },
      el('thead', null, el('tr', null, ...headers.map((h) => el('th', { scope: 'col', class: h[1] || '' }, h[0])))),
      tbody);
    return { table, tbody };
  }

  // -- row specs -------------------------------------------------------------------------------

  const RULE = {
    attrs: (r) => ({ 'data-rule': str(r.name), class: 'rule mode-' + mode(r) + (r.running === false ? ' removed' : '') }),
    cells: [
      ['name', (r) => str(r.name) + (r.running === false ? ' (removed)' : '')],
      ['route', (r) => str(r.listen) + '\n→\u00a0' + str(r.connect)],
      ['protocol', (r) => str(r.protocol)],
      ['relay', (r) => str(r.relay)],
      ['mode', (r) => mode(r)],
      ['connections num', (r) => ({
        t: pair(r.connections_active, r.connections_total),
        title: num(r.udp_flows_active) ? num(r.udp_flows_active) + ' udp flows' : null,
      })],
      ['bytes-up num', (r) => B(r.bytes_up)],
      ['bytes-down num', (r) => B(r.bytes_down)],
      ['rate-up num', (r) => rate(r.rate_up)],
      ['rate-down num', (r) => rate(r.rate_down)],
      ['denied num', (r) => String(num(r.denied_total))],
      ['errors', (r) => errs(r.errors)],
    ],
    buttons: [['pause', 'pause'], ['drain', 'drain'], ['resume', 'resume']],
    what: (r) => 'rule ' + str(r.name),
    btn: (r) => ({ 'data-rule': str(r.name) }),
  };

  const BACKEND = {
    attrs: (b) => ({ 'data-backend': str(b.name), class: 'backend state-' + str(b.state) }),
    cells: [
      ['name', (b) => str(b.name)],
      ['target', (b) => str(b.target) + ' ×' + num(b.weight) + (b.backup ? ' backup' : '')],
      ['state', (b) => str(b.state)],
      ['since', (b) => rel(b.since)],
      ['why', (b) => dash(b.why)],
      ['sessions num', (b) => pair(b.sessions_active, b.sessions_total)],
      ['bytes-up num', (b) => B(b.bytes_up)],
      ['bytes-down num', (b) => B(b.bytes_down)],
      ['failures num', (b) => String(num(b.failures))],
      ['last-check', (b) => rel(b.last_check)],
      ['result', (b) => (num(b.last_check) ? dash(b.last_check_result) : '-')],
    ],
    buttons: [['check', 'check']],
    what: (b) => 'backend ' + str(b.name) + ' of rule ' + b.rule_,
    btn: (b) => ({ 'data-rule': b.rule_, 'data-backend': str(b.name) }),
  };

  // A row holding a nested table (a rule's backends, a tunnel's forwards).
  function nested(cls, colspan, headers, rows) {
    return {
      build() {
        const { table, tbody } = subTable(headers);
        // The wrapper adds nothing to the outer table's width: a wide nested table scrolls itself.
        const tr = el('tr', { class: 'nest ' + cls }, el('td', { colspan: String(colspan) }, el('div', { class: 'nest-wrap' }, table)));
        tr.body_ = tbody;
        return tr;
      },
      update(tr, d) { sync(tr.body_, rows(d)); },
    };
  }

  const BACKENDS = nested('backends', 13, [
    ['backend'], ['target'], ['state'], ['since'], ['why'], ['sessions', 'num'], ['up', 'num'],
    ['down', 'num'], ['failures', 'num'], ['last check'], ['result'], ['actions'],
  ], (r) => (r.backends || []).map((b) => ({ k: str(b.name), s: BACKEND, d: Object.assign({ rule_: str(r.name) }, b) })));

  const SESSION = {
    attrs: (x) => ({ 'data-session': str(x.id) }),
    cells: [
      ['rule', (x) => str(x.rule)],
      ['client', (x) => str(x.client)],
      ['target', (x) => str(x.target)],
      ['via', (x) => dash(x.upstream_local)],
      ['path', (x) => str(x.path)],
      ['bytes-up num', (x) => B(x.bytes_up)],
      ['bytes-down num', (x) => B(x.bytes_down)],
      ['rate-up num', (x) => rate(x.rate_up)],
      ['rate-down num', (x) => rate(x.rate_down)],
      ['age num', (x) => ({ t: dur(x.age), v: num(x.age).toFixed(1) })],
      ['idle num', (x) => ({ t: dur(x.idle), v: num(x.idle).toFixed(1) })],
    ],
    buttons: [['close-session', 'close']],
    what: (x) => 'session ' + str(x.id) + ' ' + str(x.client) + ' to ' + str(x.target),
    btn: (x) => ({ 'data-session': str(x.id) }),
  };

  const FLOW = {
    cells: [
      ['relay', (f) => f.kind_],
      ['rule', (f) => str(f.rule)],
      ['protocol', (f) => str(f.proto)],
      ['client', (f) => str(f.client)],
      ['port num', (f) => str(f.public_port)],
      ['target', (f) => str(f.target)],
      ['state', (f) => dash(f.state)],
      ['age num', (f) => (f.age === null || f.age === undefined ? '-' : dur(f.age))],
    ],
  };

  const CLOSED = {
    cls: 'closed-row',
    attrs: (c) => ({ 'data-rule': str(c.rule) }),
    cells: [
      ['rule', (c) => str(c.rule)],
      ['client', (c) => str(c.client)],
      ['target', (c) => str(c.target)],
      ['path', (c) => str(c.path)],
      ['bytes-up num', (c) => B(c.bytes_up)],
      ['bytes-down num', (c) => B(c.bytes_down)],
      ['duration num', (c) => ({ t: lasted(c.duration), v: num(c.duration) })],
      ['reason', (c) => str(c.reason)],
      ['ended num', (c) => rel(c.ended)],
    ],
  };

  const LISTENING = {
    cells: [
      ['owner', (l) => str(l.owner)], ['kind', (l) => str(l.kind)], ['protocol', (l) => str(l.protocol)],
      ['address', (l) => dash(l.address)], ['path', (l) => str(l.path)],
    ],
  };

  const TUNNEL = {
    attrs: (t) => ({ 'data-tunnel': str(t.name), class: 'tunnel state-' + str(t.state) }),
    cells: [
      ['name', (t) => str(t.name)],
      ['server', (t) => str(t.server)],
      ['state', (t) => str(t.state)],
      ['since', (t) => rel(t.since)],
      ['reconnects num', (t) => String(num(t.reconnects))],
      ['last-error', (t) => dash(t.last_error)],
      ['link', (t) => (t.local ? str(t.local) + ' → ' + str(t.peer) : '-')],
    ],
  };

  const FORWARD = {
    attrs: (f) => ({ 'data-forward': str(f.spec) }),
    cells: [
      ['spec', (f) => str(f.spec)],
      ['kind', (f) => str(f.kind)],
      ['listen', (f) => dash(f.listen)],
      ['target', (f) => dash(f.target)],
      ['state', (f) => str(f.state)],
      ['error', (f) => dash(f.error)],
      ['connections num', (f) => pair(f.connections_active, f.connections_total)],
      ['bytes-up num', (f) => B(f.bytes_up)],
      ['bytes-down num', (f) => B(f.bytes_down)],
      ['rate-up num', (f) => rate(f.rate_up)],
      ['rate-down num', (f) => rate(f.rate_down)],
      ['errors', (f) => errs(f.errors)],
    ],
  };

  const FORWARDS = nested('forwards', 7, [
    ['forward'], ['kind'], ['listen'], ['target'], ['state'], ['error'], ['active/total', 'num'],
    ['up', 'num'], ['down', 'num'], ['up/s', 'num'], ['down/s', 'num'], ['errors'],
  ], (t) => keyed(t.forwards || [], (f) => str(f.spec), FORWARD));

  const SERVER_SESSION = {
    cells: [
      ['user', (u) => str(u.user)],
      ['source', (u) => str(u.source)],
      ['fingerprint', (u) => str(u.fingerprint)],
      ['since', (u) => rel(u.since)],
      ['forwards', (u) => (Array.isArray(u.forwards) && u.forwards.length ? u.forwards.map(str).join(', ') : '-')],
      ['connections num', (u) => pair(u.connections_active, u.connections_total)],
      ['bytes-up num', (u) => B(u.bytes_up)],
      ['bytes-down num', (u) => B(u.bytes_down)],
      ['rate-up num', (u) => rate(u.rate_up)],
      ['rate-down num', (u) => rate(u.rate_down)],
    ],
  };

  const GATEWAY_RULE = {
    cells: [
      ['chain', (g) => str(g.chain)], ['rule', (g) => dash(g.rule)],
      ['packets num', (g) => String(num(g.packets))], ['bytes num', (g) => B(g.bytes)],
    ],
  };

  const TRIGGER = {
    attrs: (t) => ({ 'data-trigger': str(t.trigger) }),
    cells: [
      ['trigger', (t) => str(t.trigger)], ['open', (t) => str(t.open)], ['host', (t) => dash(t.host)],
      ['expires num', (t) => (t.host ? { t: dur(t.expires), v: num(t.expires) } : { t: '-', v: 0 })],
    ],
  };

  const MAPPING = {
    attrs: (m) => ({ 'data-mapping': str(m.name), class: 'mapping state-' + str(m.state) }),
    cells: [
      ['name', (m) => str(m.name)],
      ['method', (m) => str(m.method)],
      ['protocol', (m) => str(m.protocol)],
      ['internal', (m) => str(m.internal)],
      ['external', (m) => dash(m.external)],
      ['state', (m) => str(m.state)],
      ['lease num', (m) => (num(m.lease) ? dur(m.lease) : '-')],
      ['expires num countdown', (m) => ({ t: countdown(m.expires, m.state), v: m.expires === null || m.expires === undefined ? '' : num(m.expires) })],
      ['renewals num', (m) => String(num(m.renewals))],
      ['recreated num', (m) => String(num(m.recreated))],
      ['last-error', (m) => dash(m.last_error)],
    ],
  };

  const WORKER = {
    attrs: (w) => ({ 'data-worker': str(w.index) }),
    cells: [
      ['index num', (w) => str(w.index)], ['pid num', (w) => str(w.pid)], ['state', (w) => str(w.state)],
      ['started', (w) => rel(w.started)], ['restarts num', (w) => String(num(w.restarts))],
      ['last-exit', (w) => dash(w.last_exit)],
    ],
  };

  // Entries keyed by key(d), made unique by a counter when a key repeats.
  function keyed(list, key, spec) {
    const seen = new Map();
    return list.map((d) => {
      let k = key(d);
      const n = seen.get(k) || 0;
      seen.set(k, n + 1);
      if (n) k += '#' + n;
      return { k, s: spec, d };
    });
  }
  const arr = (v) => (Array.isArray(v) ? v : []);

  // -- graphs ----------------------------------------------------------------------------------

  function addPoints(snap) {
    const t = now();
    const push = (key, up, down) => {
      let list = st.series.get(key);
      if (!list) st.series.set(key, (list = []));
      list.push([t, num(up), num(down)]);
      if (list.length > MAX_POINTS) list.splice(0, list.length - MAX_POINTS);
    };
    for (const r of arr(snap.rules)) push('rule:' + str(r.name), r.rate_up, r.rate_down);
    for (const tn of arr(snap.tunnels)) {
      let up = 0;
      let down = 0;
      for (const f of arr(tn.forwards)) { up += num(f.rate_up); down += num(f.rate_down); }
      push('tunnel:' + str(tn.name), up, down);
    }
  }

  const GRAPH = {
    build(g) {
      const box = svg('svg', {
        class: 'rate-graph', viewBox: '0 0 ' + GRAPH_W + ' ' + GRAPH_H, role: 'img', 'data-series': g.key,
      });
      const title = svg('title');
      const max = svg('text', { class: 'ymax', x: 2, y: 10 });
      const up = svg('polyline', { class: 'up', points: '' });
      const down = svg('polyline', { class: 'down', points: '' });
      box.append(title,
        svg('line', { class: 'axis', x1: 0, y1: 13, x2: GRAPH_W, y2: 13 }),
        svg('line', { class: 'axis', x1: 0, y1: GRAPH_H - 0.5, x2: GRAPH_W, y2: GRAPH_H - 0.5 }),
        down, up, max);
      const cur = el('span', { class: 'now' });
      const card = el('figure', { class: 'card graph', 'data-series': g.key },
        el('figcaption', null, el('span', { class: 'gname', text: g.label }), cur), box);
      Object.assign(card, { up_: up, down_: down, max_: max, cur_: cur, title_: title });
      return card;
    },
    update(card, g) {
      const list = st.series.get(g.key) || [];
      const span = MAX_POINTS * (st.interval || 1);
      const t0 = now() - span;
      let top = 0;
      for (const p of list) if (p[0] >= t0) top = Math.max(top, p[1], p[2]);
      top = Math.max(top, 1024);
      const scale = (GRAPH_H - 16) / top;
      const line = (i) => {
        const pts = [];
        for (const p of list) {
          if (p[0] < t0) continue;
          const x = Math.min(GRAPH_W, ((p[0] - t0) / span) * GRAPH_W);
          pts.push(x.toFixed(1) + ',' + (GRAPH_H - 1 - p[i] * scale).toFixed(1));
        }
        return pts.join(' ');
      };
      setAttr(card.up_, 'points', line(1));
      setAttr(card.down_, 'points', line(2));
      const last = list[list.length - 1] || [0, 0, 0];
      setText(card.max_, bytes(top) + '/s');
      setText(card.cur_, '↑ ' + rate(last[1]) + ' ↓ ' + rate(last[2]));
      setText(card.title_, g.label + ': up ' + rate(last[1]) + ', down ' + rate(last[2]) + '; scale ' + bytes(top) + '/s');
    },
  };

  // -- rendering -------------------------------------------------------------------------------

  function matches(x) {
    const f = st.filter;
    if (!f) return true;
    return [x.rule, x.client, x.target].some((v) => str(v).toLowerCase().includes(f));
  }

  const NUMERIC = new Set(['bytes_up', 'bytes_down', 'age', 'idle']);
  function sortSessions(list, rules) {
    const { key, dir } = st.sort;
    const order = new Map(rules.map((r, i) => [str(r.name), i]));
    const rank = (x) => (order.has(str(x.rule)) ? order.get(str(x.rule)) : order.size);
    const byId = (a, b) => num(a.id) - num(b.id);
    let cmp;
    if (!key) cmp = (a, b) => rank(a) - rank(b) || num(b.age) - num(a.age) || byId(a, b);
    else if (NUMERIC.has(key)) cmp = (a, b) => dir * (num(a[key]) - num(b[key])) || byId(a, b);
    else cmp = (a, b) => dir * str(a[key]).localeCompare(str(b[key]), undefined, { numeric: true }) || byId(a, b);
    return list.slice().sort(cmp);
  }

  function renderHeader(s) {
    setText($('instance'), str(s.instance) || (st.info ? str(st.info.instance) : ''));
    setText($('kind'), str(s.kind));
    setText($('pid'), str(s.pid));
    setText($('config'), str(s.config) || '(none)');
    if (!st.info && s.instance) document.title = 'portfwd — ' + str(s.instance);
    tick();
  }

  function renderRules(s) {
    const rules = arr(s.rules);
    const entries = [];
    for (const r of rules) {
      entries.push({ k: 'r:' + str(r.name), s: RULE, d: r });
      if (arr(r.backends).length) entries.push({ k: 'b:' + str(r.name), s: BACKENDS, d: r });
    }
    sync($('rules-body'), entries);
    section('rules', true, !rules.length);
  }

  function renderGraphs(s) {
    const graphs = [];
    for (const r of arr(s.rules)) graphs.push({ key: 'rule:' + str(r.name), label: 'rule ' + str(r.name) });
    for (const t of arr(s.tunnels)) graphs.push({ key: 'tunnel:' + str(t.name), label: 'tunnel ' + str(t.name) });
    sync($('graphs-grid'), graphs.map((g) => ({ k: g.key, s: GRAPH, d: g })));
    section('graphs', graphs.length > 0, !graphs.length);
  }

  function renderSessions(s) {
    const all = arr(s.sessions);
    const shown = sortSessions(all.filter(matches), arr(s.rules));
    sync($('sessions-body'), shown.map((x) => ({ k: str(x.id), s: SESSION, d: x })));
    const flowsAll = arr(s.kernel_sessions).map((f) => Object.assign({ kind_: 'kernel' }, f))
      .concat(arr(s.gateway_sessions).map((f) => Object.assign({ kind_: 'gateway' }, f)));
    const flows = flowsAll.filter(matches);
    sync($('flows-body'), keyed(flows, (f) => [f.kind_, f.rule, f.proto, f.client, f.target].map(str).join('|'), FLOW));
    show($('flows'), flows.length > 0);
    show($('sessions-wrap'), shown.length > 0);
    const none = $('sessions').querySelector('p.none');
    const total = all.length + flowsAll.length;
    setText(none, total ? 'no session matches the filter' : 'no live sessions');
    show(none, !shown.length && !flows.length);
    const count = st.filter
      ? (shown.length + flows.length) + ' of ' + total + ' match'
      : all.length + (all.length === 1 ? ' session' : ' sessions') + (flowsAll.length ? ', ' + flowsAll.length + ' kernel/gateway flows' : '');
    const omitted = s.omitted && typeof s.omitted === 'object' ? s.omitted : {};
    const more = ['sessions', 'kernel_sessions', 'gateway_sessions']
      .reduce((n, key) => n + (Number(omitted[key]) > 0 ? Number(omitted[key]) : 0), 0);
    setText($('sessions-count'), count + (more ? ' (' + more + ' more not shown: the largest are listed)' : ''));
  }

  function renderClosed(s) {
    const all = arr(s.closed);
    const shown = all.filter(matches);
    sync($('closed-body'), keyed(shown, (c) => [c.rule, c.client, c.target, c.started, c.ended].map(str).join('|'), CLOSED));
    section('closed', true, !shown.length);
    setText($('closed').querySelector('p.none'), all.length ? 'none matches the filter' : 'none');
  }

  function renderSimple(id, list, key, spec, visible) {
    sync($(id + '-body'), keyed(list, key, spec));
    section(id, visible === undefined ? list.length > 0 : visible, !list.length);
  }

  function renderTunnels(s) {
    const entries = [];
    for (const t of arr(s.tunnels)) {
      entries.push({ k: 't:' + str(t.name), s: TUNNEL, d: t });
      if (arr(t.forwards).length) entries.push({ k: 'f:' + str(t.name), s: FORWARDS, d: t });
    }
    sync($('tunnels-body'), entries);
    section('tunnels', entries.length > 0, !entries.length);
  }

  function renderServer(s) {
    const users = arr(s.server_sessions);
    const failures = num(s.server_auth_failures);
    sync($('server-body'), keyed(users, (u) => [u.user, u.source, u.since].map(str).join('|'), SERVER_SESSION));
    setText($('server-failures'), 'authentication failures: ' + failures);
    section('server', s.kind === 'server' || users.length > 0 || failures > 0, !users.length);
  }

  function renderGateway(s) {
    const role = str(s.gateway_role);
    const rules = arr(s.gateway_rules);
    const triggers = arr(s.triggers);
    setText($('gateway-role'), role ? 'HA role: ' + role : '');
    show($('gateway-role'), !!role);
    sync($('gateway-rules-body'), keyed(rules, (g) => str(g.chain) + '|' + str(g.rule), GATEWAY_RULE));
    sync($('triggers-body'), keyed(triggers, (t) => str(t.trigger), TRIGGER));
    show($('gateway-rules'), rules.length > 0);
    show($('triggers'), triggers.length > 0);
    const any = !!role || rules.length > 0 || triggers.length > 0;
    section('gateway', any, !rules.length && !triggers.length);
  }

  function render() {
    const s = st.snap;
    if (!s) return;
    renderHeader(s);
    renderRules(s);
    renderGraphs(s);
    renderSimple('listening', arr(s.listening), (l) => [l.owner, l.protocol, l.address].map(str).join('|'), LISTENING);
    renderSessions(s);
    renderClosed(s);
    renderTunnels(s);
    renderServer(s);
    renderGateway(s);
    renderSimple('mappings', arr(s.mappings), (m) => str(m.name) + '|' + str(m.protocol), MAPPING);
    renderSimple('workers', arr(s.workers), (w) => str(w.index), WORKER);
  }

  // Once a second, between status events too: uptime and the mapping lease countdowns.
  function tick() {
    const s = st.snap;
    if (!s) return;
    setText($('uptime'), num(s.started) ? dur(now() - num(s.started)) : '-');
    const rows = $('mappings-body').rows_;
    if (rows) {
      for (const [, tr] of rows) {
        const m = tr.data_;
        if (m) setText(tr.cells_[7], countdown(m.expires, m.state));
      }
    }
  }
  // -- the event stream ------------------------------------------------------------------------

  function setConnection(text, stateName) {
    const c = $('connection');
    setText(c, text);
    setAttr(c, 'data-state', stateName);
    document.body.classList.toggle('stale', stateName !== 'live');
  }

  function message(text, isError) {
    const m = $('message');
    m.textContent = text;
    m.className = isError ? 'error' : 'ok';
  }

  // The SSE framing: lines, `event:`/`data:` fields, a blank line ends an event, `:` comments.
  function sseParser(onEvent) {
    let buf = '';
    let type = '';
    let data = [];
    return (chunk) => {
      buf += chunk;
      for (;;) {
        const i = buf.search(/[\r\n]/);
        if (i < 0) break;
        if (buf[i] === '\r' && i === buf.length - 1) break; // maybe half of \r\n: wait
        const line = buf.slice(0, i);
        buf = buf.slice(i + (buf[i] === '\r' && buf[i + 1] === '\n' ? 2 : 1));
        if (line === '') {
          if (data.length) onEvent(type || 'message', data.join('\n'));
          type = '';
          data = [];
          continue;
        }
        if (line[0] === ':') continue;
        const c = line.indexOf(':');
        const field = c < 0 ? line : line.slice(0, c);
        let value = c < 0 ? '' : line.slice(c + 1);
        if (value[0] === ' ') value = value.slice(1);
        if (field === 'event') type = value;
        else if (field === 'data') data.push(value);
      }
    };
  }

  function onEvent(type, data) {
    let payload;
    try {
      payload = JSON.parse(data);
    } catch (_) {
      message('bad ' + type + ' event from the server', true);
      return;
    }
    if (type === 'history' && payload && typeof payload === 'object') {
      st.interval = num(payload.interval) || 1;
      if (num(payload.now)) st.offset = num(payload.now) - Date.now() / 1000;
      st.series = new Map();
      const series = payload.series && typeof payload.series === 'object' ? payload.series : {};
      for (const key of Object.keys(series)) {
        const list = arr(series[key]).filter((p) => Array.isArray(p) && p.length >= 3)
          .map((p) => [num(p[0]), num(p[1]), num(p[2])]).slice(-MAX_POINTS);
        st.series.set(key, list);
      }
      if (st.snap) render();
    } else if (type === 'status' && payload && typeof payload === 'object') {
      st.backoff = 2000;
      st.snap = payload;
      addPoints(payload);
      try {
        render();
      } catch (e) {
        console.warn('portfwd: render failed', e);
        message('could not draw the status: ' + (e && e.message), true);
      }
    }
  }

  async function errorText(res) {
    try {
      const j = await res.json();
      if (j && typeof j.error === 'string') return j.error;
    } catch (_) { /* not JSON */ }
    return res.statusText || 'request failed';
  }

  function tokenNeeded(text) {
    setConnection('token needed', 'token');
    message('401: ' + text, true);
    const form = $('token-form');
    form.hidden = false;
    form.classList.add('attention');
    $('token').focus();
  }

  function scheduleRetry() {
    setConnection('reconnecting', 'reconnecting');
    clearTimeout(st.retry);
    const wait = st.backoff;
    st.backoff = Math.min(10000, st.backoff * 2);
    st.retry = setTimeout(connect, wait);
  }

  async function connect() {
    clearTimeout(st.retry);
    if (st.ctrl) st.ctrl.abort();
    const ctrl = (st.ctrl = new AbortController());
    let res;
    try {
      res = await fetch('api/v1/events', {
        headers: authHeaders({ Accept: 'text/event-stream' }),
        signal: ctrl.signal,
        cache: 'no-store',
      });
    } catch (_) {
      if (ctrl === st.ctrl) scheduleRetry();
      return;
    }
    if (ctrl !== st.ctrl) return;
    if (res.status === 401) {
      tokenNeeded(await errorText(res));
      return;
    }
    if (!res.ok || !res.body) {
      message(res.status + ': ' + (await errorText(res)), true);
      if (ctrl === st.ctrl) scheduleRetry();
      return;
    }
    setConnection('live', 'live');
    $('token-form').classList.remove('attention');
    if (!st.info) loadInfo();
    st.seen = Date.now();
    const parse = sseParser(onEvent);
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done || ctrl !== st.ctrl) break;
        st.seen = Date.now();
        parse(value);
      }
    } catch (_) { /* dropped or aborted */ }
    reader.cancel().catch(() => { /* already closed or aborted */ });
    if (ctrl === st.ctrl) scheduleRetry();
  }

  function restart() {
    st.backoff = 2000;
    connect();
  }

  async function loadInfo() {
    try {
      const res = await fetch('api/v1/info', { headers: authHeaders(), cache: 'no-store' });
      if (!res.ok) return;
      const info = await res.json();
      if (!info || typeof info !== 'object') return;
      st.info = info;
      document.title = 'portfwd — ' + str(info.instance);
      setText($('version'), info.version ? 'v' + str(info.version) : '');
      if (!$('instance').textContent) setText($('instance'), str(info.instance));
      const note = $('auth-note');
      if (info.actions === false) {
        setText(note, 'This instance has no token: actions are refused.');
        show(note, true);
      } else {
        show(note, false);
      }
    } catch (_) { /* the stream's state says enough */ }
  }

  // -- actions ---------------------------------------------------------------------------------

  async function act(url, done) {
    if (st.pending.has(url)) return;
    st.pending.add(url);
    try {
      const res = await fetch(url, { method: 'POST', headers: authHeaders(), cache: 'no-store' });
      let j = null;
      try { j = await res.json(); } catch (_) { /* empty or not JSON */ }
      if (res.ok && !(j && typeof j.error === 'string')) {
        const extra = j && ['message', 'result', 'detail'].map((k) => j[k]).find((v) => typeof v === 'string' && v);
        message(done + (extra ? ': ' + extra : ''), false);
      } else {
        const text = j && typeof j.error === 'string' ? j.error : res.statusText || 'refused';
        message(res.status + ': ' + text, true);
        if (res.status === 401) {
          $('token-form').classList.add('attention');
          $('token').focus();
        }
      }
    } catch (e) {
      message('network error: ' + ((e && e.message) || 'no answer'), true);
    } finally {
      st.pending.delete(url);
    }
  }

  const enc = encodeURIComponent;
  const VERBS = { pause: 'paused', drain: 'draining', resume: 'resumed' };

  function onClick(e) {
    const b = e.target.closest('button');
    if (!b || b.disabled) return;
    const sortKey = b.getAttribute('data-sort');
    if (sortKey) {
      st.sort = st.sort.key === sortKey ? { key: sortKey, dir: -st.sort.dir } : { key: sortKey, dir: 1 };
      for (const th of $('sessions-table').querySelectorAll('thead th')) {
        const k = th.querySelector('button[data-sort]');
        if (k && k.getAttribute('data-sort') === sortKey) th.setAttribute('aria-sort', st.sort.dir > 0 ? 'ascending' : 'descending');
        else th.removeAttribute('aria-sort');
      }
      if (st.snap) renderSessions(st.snap);
      return;
    }
    const rule = b.getAttribute('data-rule');
    for (const verb of Object.keys(VERBS)) {
      if (b.classList.contains(verb) && rule !== null) {
        act('api/v1/rules/' + enc(rule) + '/' + verb, 'rule ' + rule + ': ' + VERBS[verb]);
        return;
      }
    }
    if (b.classList.contains('check') && rule !== null) {
      const backend = b.getAttribute('data-backend') || '';
      act('api/v1/rules/' + enc(rule) + '/backends/' + enc(backend) + '/check', 'backend ' + backend + ': checked');
    } else if (b.classList.contains('close-session')) {
      const id = b.getAttribute('data-session') || '';
      act('api/v1/sessions/' + enc(id) + '/close', 'session ' + id + ': closed');
    } else if (b.id === 'reload') {
      act('api/v1/reload', 'configuration reloaded');
    }
  }

  function typing(node) {
    if (!node || node === document.body) return false;
    const tag = node.tagName;
    return tag === 'INPUT' || tag === 'TEXTAREA' || tag === 'SELECT' || node.isContentEditable;
  }

  function init() {
    document.addEventListener('click', onClick);
    document.addEventListener('keydown', (e) => {
      if (e.key === '/' && !e.ctrlKey && !e.metaKey && !e.altKey && !typing(e.target)) {
        e.preventDefault();
        const f = $('filter');
        f.focus();
        f.select();
      }
    });
    const filter = $('filter');
    filter.addEventListener('input', () => {
      st.filter = filter.value.trim().toLowerCase();
      if (st.snap) { renderSessions(st.snap); renderClosed(st.snap); }
    });
    $('token-form').addEventListener('submit', (e) => {
      e.preventDefault();
      const input = $('token');
      const value = input.value.trim();
      setToken(value);
      input.value = '';
      message(value ? 'token saved for this tab' : 'token cleared', false);
      $('token-form').classList.remove('attention');
      restart();
    });
    setInterval(() => {
      tick();
      if (st.ctrl && $('connection').getAttribute('data-state') === 'live' && Date.now() - st.seen > STALL_MS) {
        st.ctrl.abort();
      }
    }, 1000);
    loadInfo();
    connect();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();
