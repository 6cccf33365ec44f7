// Builds ../plotly.min.js: plotly.js with its core (scatter, shapes, hover, colorbar ...) and the
// heatmap trace only, the two trace types the page draws. A third of the full bundle, so that a
// first visit parses ~1.2 MB instead of 4.8 MB. The settings are those of plotly.js's own
// esbuild-config.js (CSS inlined, glsl, NODE_DEBUG off); `npm ci && npm run build` here.
const esbuild = require('esbuild');
const path = require('path');
const { environmentPlugin } = require('esbuild-plugin-environment');
const { glsl } = require('esbuild-plugin-glsl');
const InlineCSSPlugin = require('esbuild-plugin-inline-css');
const version = require('plotly.js/package.json').version;

esbuild.build({
    entryPoints: [path.join(__dirname, 'entry.js')],
    outfile: path.join(__dirname, '..', 'plotly.min.js'),
    banner: {
        js: `/*! plotly.js v${version} (core and heatmap only, built by spinjax's static/plotly-bundle)\n` +
            ' * Copyright 2012-2026, Plotly, Inc. Licensed under the MIT license. */',
    },
    format: 'iife',
    globalName: 'Plotly',
    bundle: true,
    minify: true,
    sourcemap: false,
    plugins: [InlineCSSPlugin(), glsl({ minify: true }), environmentPlugin({ NODE_DEBUG: false })],
    alias: { regl: '@plotly/regl', stream: 'stream-browserify' },
    define: { global: 'window', 'define.amd': 'false' },
    target: 'es2016',
    logLevel: 'info',
}).catch(() => process.exit(1));
