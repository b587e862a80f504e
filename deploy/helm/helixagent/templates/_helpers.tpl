{{/* Chart name, truncated to the 63 characters a DNS label allows. */}}
{{- define "helixagent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: <release>-<chart> unless the release name already contains the chart name. */}}
{{- define "helixagent.fullname" -}}
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

{{- define "helixagent.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "helixagent.instanceLabels" -}}
app.kubernetes.io/name: {{ include "helixagent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The gateway pods (Deployment, Service, PDB, ServiceMonitor); the migration Job's pods do not match. */}}
{{- define "helixagent.selectorLabels" -}}
{{ include "helixagent.instanceLabels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "helixagent.labels" -}}
helm.sh/chart: {{ include "helixagent.chart" . }}
{{ include "helixagent.instanceLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "helixagent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "helixagent.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "helixagent.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "helixagent.configPath" -}}
{{- printf "%s/config.yaml" (trimSuffix "/" .Values.configMountPath) }}
{{- end }}

{{- define "helixagent.httpPort" -}}
{{- .Values.config.server.port | default 7061 }}
{{- end }}

{{/* The gateway's YAML config file, as the ConfigMap's data. */}}
{{- define "helixagent.configData" -}}
config.yaml: |
{{ toYaml .Values.config | indent 2 }}
{{- end }}

{{/* Environment shared by the gateway and the migration Job: the config file and the secrets, by reference only. */}}
{{- define "helixagent.env" -}}
- name: HELIXAGENT_CONFIG
  value: {{ include "helixagent.configPath" . | quote }}
{{- $default := required "secrets.existingSecret is required: the name of a Secret holding HELIXAGENT_API_KEY, the provider keys, the database/Redis URLs and HELIXAGENT_ENCRYPTION_KEYS (the chart never holds secret values)" .Values.secrets.existingSecret }}
{{- range $name, $ref := .Values.secrets.env }}
{{- $ref = $ref | default dict }}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ $ref.secret | default $default | quote }}
      key: {{ $ref.key | default $name | quote }}
      {{- if $ref.optional }}
      optional: true
      {{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Volumes shared by the gateway and the migration Job ($cm: the ConfigMap's name). */}}
{{- define "helixagent.volumes" -}}
- name: config
  configMap:
    name: {{ .cm }}
- name: spool
  {{- if .root.Values.spool.persistentVolumeClaim.claimName }}
  persistentVolumeClaim:
    claimName: {{ .root.Values.spool.persistentVolumeClaim.claimName }}
  {{- else }}
  emptyDir:
    {{- toYaml .root.Values.spool.emptyDir | nindent 4 }}
  {{- end }}
- name: tmp
  emptyDir:
    {{- toYaml .root.Values.tmp.emptyDir | nindent 4 }}
{{- end }}

{{- define "helixagent.volumeMounts" -}}
- name: config
  mountPath: {{ .Values.configMountPath }}
  readOnly: true
- name: spool
  mountPath: {{ .Values.spool.mountPath }}
- name: tmp
  mountPath: /tmp
{{- end }}
