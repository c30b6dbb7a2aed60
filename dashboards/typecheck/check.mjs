// Type-checks every dashboard in dashboards/ against @grafana/schema's
// Dashboard type (with `satisfies`, so literal values and unknown keys are
// checked), and parses every LogQL and TraceQL query with Grafana's own
// grammars.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import ts from 'typescript';
import { parser as logql } from '@grafana/lezer-logql';
import { parser as traceql } from '@grafana/lezer-traceql';

const here = path.dirname(fileURLToPath(import.meta.url));
const dashboards = process.argv[2] ?? path.resolve(here, '..');
const files = fs.readdirSync(dashboards).filter((f) => f.endsWith('.json')).sort();
if (files.length === 0) {
  console.error(`no dashboards in ${dashboards}`);
  process.exit(1);
}

// 1. Types: each dashboard becomes `export const dashboard = JSON satisfies Dashboard;`.
function typecheck(named) {
  const out = fs.mkdtempSync(path.join(os.tmpdir(), 'flowtel-dash-'));
  const sources = named.map(([f, json]) => {
    const file = path.join(out, f.replace(/\.json$/, '.ts'));
    fs.writeFileSync(
      file,
      `import type { Dashboard } from '@grafana/schema';\nexport const dashboard = ${json.trim()} satisfies Dashboard;\n`,
    );
    return file;
  });
  const program = ts.createProgram(sources, {
  strict: true,
  noEmit: true,
  module: ts.ModuleKind.NodeNext,
  moduleResolution: ts.ModuleResolutionKind.NodeNext,
  target: ts.ScriptTarget.ES2022,
  skipLibCheck: true,
  typeRoots: [],
  baseUrl: here,
    paths: { '@grafana/schema': [path.join(here, 'node_modules/@grafana/schema')] },
  });
  const diagnostics = ts.getPreEmitDiagnostics(program).map((d) => {
    const where = d.file
      ? `${path.basename(d.file.fileName)}:${d.file.getLineAndCharacterOfPosition(d.start ?? 0).line + 1}`
      : '';
    return `${where}: ${ts.flattenDiagnosticMessageText(d.messageText, '\n')}`;
  });
  fs.rmSync(out, { recursive: true, force: true });
  return diagnostics;
}

function errorAt(parser, expr) {
  let at = -1;
  parser.parse(expr).iterate({
    enter: (n) => {
      if (n.type.isError && at < 0) at = n.from;
    },
  });
  return at;
}

const named = files.map((f) => [f, fs.readFileSync(path.join(dashboards, f), 'utf8')]);
const diagnostics = typecheck(named);
for (const d of diagnostics) console.error(`type error ${d}`);

const logqlErrorAt = (expr) => errorAt(logql, expr);
const traceqlErrorAt = (expr) => errorAt(traceql, expr);

// 2. LogQL and TraceQL syntax.
let queries = 0;
let logqlErrors = 0;
let traceqlQueries = 0;
let traceqlErrors = 0;
for (const f of files) {
  const dash = JSON.parse(fs.readFileSync(path.join(dashboards, f), 'utf8'));
  const panels = (dash.panels ?? []).flatMap((p) => [p, ...(p.panels ?? [])]);
  for (const p of panels) {
    for (const t of p.targets ?? []) {
      const type = t.datasource?.type ?? p.datasource?.type;
      if (type === 'tempo' && t.queryType === 'traceql') {
        traceqlQueries += 1;
        const at = traceqlErrorAt(t.query ?? '');
        if (at >= 0 || !t.query) {
          traceqlErrors += 1;
          console.error(`TraceQL error in ${f} / ${p.title} at ${at}: ${t.query}`);
        }
        continue;
      }
      if (type !== 'loki' || !t.expr) continue;
      queries += 1;
      const expr = t.expr
        .replaceAll('$__range', '1h')
        .replaceAll('$__auto', '1m')
        .replaceAll('$__interval', '1m');
      const at = logqlErrorAt(expr);
      if (at >= 0) {
        logqlErrors += 1;
        console.error(`LogQL error in ${f} / ${p.title} at ${at}: ${expr}`);
      }
    }
  }
}
// 3. Both checks can fail: a dashboard with a wrong type and an unknown key,
// and broken LogQL.
const [first, text] = named[0];
const breakers = {
  'graphTooltip a string': (d) => (d.graphTooltip = 'shared'),
  'gridPos.w a string': (d) => (d.panels[0].gridPos.w = '12'),
  'an unknown key': (d) => (d.refreshEvery = '30s'),
};
const missed = Object.entries(breakers)
  .filter(([, breakIt]) => {
    const broken = JSON.parse(text);
    breakIt(broken);
    return typecheck([[first, JSON.stringify(broken)]]).length === 0;
  })
  .map(([what]) => what);
const brokenLogql = ['{service_name="flowtel" | unwrap', 'sum by (a (count_over_time({a="b"}[1m]))'].filter(
  (e) => logqlErrorAt(e) < 0,
);
const brokenTraceql = ['{ kind = client && }', '{ span.a = }'].filter((e) => traceqlErrorAt(e) < 0);
if (missed.length > 0 || brokenLogql.length > 0 || brokenTraceql.length > 0) {
  console.error(
    `self-test failed: type check accepted ${JSON.stringify(missed)}, LogQL accepted ${JSON.stringify(brokenLogql)}, ` +
      `TraceQL accepted ${JSON.stringify(brokenTraceql)}`,
  );
  process.exit(1);
}

console.log(
  `${files.length} dashboards type-checked against @grafana/schema: ${diagnostics.length} errors; ` +
    `${queries} LogQL queries parsed: ${logqlErrors} errors; ` +
    `${traceqlQueries} TraceQL queries parsed: ${traceqlErrors} errors; ` +
    `self-test: ${Object.keys(breakers).length} broken dashboards, 2 broken LogQL and 2 broken TraceQL queries rejected`,
);
process.exit(diagnostics.length + logqlErrors + traceqlErrors > 0 ? 1 : 0);
