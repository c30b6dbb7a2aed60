{{/* The chart's name, or nameOverride. */}}
{{- define "flowtel.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The full name of every object: fullnameOverride, else the release name
when it already holds the chart name, else RELEASE-CHART. */}}
{{- define "flowtel.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "flowtel.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "flowtel.labels" -}}
helm.sh/chart: {{ include "flowtel.chart" . }}
{{ include "flowtel.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The labels the DaemonSet, Service and PodMonitor select pods by. */}}
{{- define "flowtel.selectorLabels" -}}
app.kubernetes.io/name: {{ include "flowtel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "flowtel.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "flowtel.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "flowtel.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* flowtel's configuration: .Values.config, with export.prometheus.listen
filled in from prometheus.port when prometheus.enabled and it is unset. */}}
{{- define "flowtel.config" -}}
{{- $cfg := deepCopy (.Values.config | default dict) }}
{{- if .Values.prometheus.enabled }}
{{- $export := get $cfg "export" | default dict }}
{{- $prom := get $export "prometheus" | default dict }}
{{- if not (get $prom "listen") }}
{{- $_ := set $prom "listen" (printf "0.0.0.0:%d" (int .Values.prometheus.port)) }}
{{- end }}
{{- $_ := set $export "prometheus" $prom }}
{{- $_ := set $cfg "export" $export }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* The port of the Prometheus endpoint, from export.prometheus.listen. */}}
{{- define "flowtel.metricsPort" -}}
{{- $cfg := include "flowtel.config" . | fromYaml }}
{{- $listen := dig "export" "prometheus" "listen" "" $cfg }}
{{- regexFind "[0-9]+$" $listen | default (toString .Values.prometheus.port) }}
{{- end }}

{{/* health.listen: empty disables the probes. */}}
{{- define "flowtel.healthListen" -}}
{{- dig "health" "listen" "127.0.0.1:9810" (.Values.config | default dict) }}
{{- end }}

{{- define "flowtel.healthPort" -}}
{{- regexFind "[0-9]+$" (include "flowtel.healthListen" .) }}
{{- end }}

{{/* The address the kubelet probes: health.listen's host, or loopback when
it listens on every address. The kubelet shares the node's network
namespace with the pod (hostNetwork), so loopback reaches flowtel. */}}
{{- define "flowtel.healthHost" -}}
{{- $host := regexReplaceAll ":[0-9]+$" (include "flowtel.healthListen" .) "" | trimPrefix "[" | trimSuffix "]" }}
{{- if has $host (list "" "0.0.0.0" "::") }}127.0.0.1{{ else }}{{ $host }}{{ end }}
{{- end }}
